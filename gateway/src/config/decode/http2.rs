//! Decoding `limits.http2:` into [`Http2Limits`] (see `docs/gateway.md`, "HTTP/2 limits").
//! Every bad value is reported at its position, with the others. Only settings hyper's
//! HTTP/2 server has are accepted, and none of them can be switched off: a limit that
//! hyper would take as "unbounded" is not representable here.

use fairgate_policies::decode::{uint, Ctx, Decode, MapReader, Path};
use fairgate_policies::model::ByteSize;
use fairgate_policies::yaml::Node;

use super::positive_duration;
use crate::config::model::Http2Limits;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The `limits.http2:` map.
pub(super) fn http2(ctx: &mut Ctx, node: &Node, path: &Path<'_>) -> Option<Http2Limits> {
    let d = Http2Limits::default();
    let mut m = MapReader::new(ctx, node, path)?;
    let max_concurrent_streams = m.optional_with(ctx, "max_concurrent_streams", |c, n, p| {
        count(c, n, p, 10_000)
    });
    let max_header_list_size = m.optional_with(ctx, "max_header_list_size", |c, n, p| {
        size(c, n, p, (KIB, "1KiB"), (16 * MIB, "16MiB"))
    });
    let max_pending_accept_reset_streams =
        m.optional_with(ctx, "max_pending_accept_reset_streams", |c, n, p| {
            count(c, n, p, 10_000)
        });
    let max_local_error_reset_streams =
        m.optional_with(ctx, "max_local_error_reset_streams", |c, n, p| {
            count(c, n, p, 1_000_000)
        });
    let keep_alive_interval = m.optional_with(ctx, "keep_alive_interval", positive_duration);
    let timeout_node = m.entry("keep_alive_timeout").map(|e| e.value);
    let keep_alive_timeout = m.optional_with(ctx, "keep_alive_timeout", positive_duration);
    let initial_stream_window = m.optional_with(ctx, "initial_stream_window", |c, n, p| {
        size(c, n, p, (KIB, "1KiB"), (GIB, "1GiB"))
    });
    let initial_connection_window = m.optional_with(ctx, "initial_connection_window", |c, n, p| {
        size(c, n, p, (64 * KIB, "64KiB"), (GIB, "1GiB"))
    });
    let max_send_buf_size = m.optional_with(ctx, "max_send_buf_size", |c, n, p| {
        size(c, n, p, (KIB, "1KiB"), (GIB, "1GiB"))
    });
    m.finish(ctx);
    if let (Some(n), Some(_), None) = (timeout_node, keep_alive_timeout, keep_alive_interval) {
        ctx.error(
            n,
            &path.key("keep_alive_timeout"),
            "needs `keep_alive_interval` (without it no PING is sent)",
        );
        return None;
    }
    Some(Http2Limits {
        max_concurrent_streams: max_concurrent_streams
            .map_or(d.max_concurrent_streams, |v| v as u32),
        max_header_list_size: max_header_list_size.or(d.max_header_list_size),
        max_pending_accept_reset_streams: max_pending_accept_reset_streams
            .map_or(d.max_pending_accept_reset_streams, |v| v as usize),
        max_local_error_reset_streams: max_local_error_reset_streams
            .map_or(d.max_local_error_reset_streams, |v| v as usize),
        keep_alive_interval: keep_alive_interval.or(d.keep_alive_interval),
        keep_alive_timeout: keep_alive_timeout.or(d.keep_alive_timeout),
        initial_stream_window: initial_stream_window.or(d.initial_stream_window),
        initial_connection_window: initial_connection_window.or(d.initial_connection_window),
        max_send_buf_size: max_send_buf_size.or(d.max_send_buf_size),
    })
}

/// A count in `1..=max`.
fn count(ctx: &mut Ctx, node: &Node, path: &Path<'_>, max: u64) -> Option<u64> {
    let v = uint(ctx, node, path, max)?;
    if v == 0 {
        ctx.error(node, path, "must be at least 1");
        return None;
    }
    Some(v)
}

/// A byte size in `min..=max` (both at most 1GiB or 16MiB, so it fits a `u32`).
fn size(
    ctx: &mut Ctx,
    node: &Node,
    path: &Path<'_>,
    (min, min_text): (u64, &str),
    (max, max_text): (u64, &str),
) -> Option<u32> {
    let b = ByteSize::decode(ctx, node, path)?.0;
    match u32::try_from(b) {
        Ok(v) if (min..=max).contains(&b) => Some(v),
        _ => {
            ctx.error(
                node,
                path,
                format!("must be between {min_text} and {max_text}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path as FsPath;
    use std::time::Duration;

    use crate::config::{parse, Http2Limits, Limits};

    fn with(limits: &str) -> Result<Limits, String> {
        let src = format!(
            "listen: 127.0.0.1:8080\nroutes: [{{upstream: api}}]\nupstreams: {{api: {{targets: [127.0.0.1:9000]}}}}\nlimits:\n{limits}\n"
        );
        parse(&src, "gw.yaml", FsPath::new("/tmp/gw.yaml"))
            .map(|c| c.config.limits)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_hardened_ones() {
        let l = with("  max_header_bytes: 32KiB").unwrap();
        assert_eq!(l.http2, Http2Limits::default());
        assert_eq!(l.http2.max_concurrent_streams, 100);
        assert_eq!(l.http2.max_pending_accept_reset_streams, 20);
        assert_eq!(l.http2.max_local_error_reset_streams, 1024);
        assert_eq!(l.http2.header_list_size(l.max_header_bytes), 32 * 1024);
        assert_eq!(Limits::default().http2, Http2Limits::default());
        assert_eq!(
            Http2Limits::default().header_list_size(usize::MAX),
            u32::MAX
        );
        // An empty map is the defaults too.
        assert_eq!(with("  http2: {}").unwrap().http2, Http2Limits::default());
    }

    #[test]
    fn the_documented_block_decodes() {
        let l = with(
            "  http2:
    max_concurrent_streams: 50
    max_header_list_size: 16KiB
    max_pending_accept_reset_streams: 10
    max_local_error_reset_streams: 200
    keep_alive_interval: 30s
    keep_alive_timeout: 5s
    initial_stream_window: 256KiB
    initial_connection_window: 1MiB
    max_send_buf_size: 128KiB",
        )
        .unwrap();
        assert_eq!(
            l.http2,
            Http2Limits {
                max_concurrent_streams: 50,
                max_header_list_size: Some(16 * 1024),
                max_pending_accept_reset_streams: 10,
                max_local_error_reset_streams: 200,
                keep_alive_interval: Some(Duration::from_secs(30)),
                keep_alive_timeout: Some(Duration::from_secs(5)),
                initial_stream_window: Some(256 * 1024),
                initial_connection_window: Some(1 << 20),
                max_send_buf_size: Some(128 * 1024),
            }
        );
        assert_eq!(l.http2.header_list_size(l.max_header_bytes), 16 * 1024);
        let only_interval = with("  http2: {keep_alive_interval: 1s}").unwrap();
        assert_eq!(only_interval.http2.keep_alive_timeout, None);
    }

    #[test]
    fn bad_values_are_reported_with_their_positions() {
        let err = with(
            "  http2:
    max_concurrent_streams: 0
    max_header_list_size: 100
    max_pending_accept_reset_streams: 20000
    max_local_error_reset_streams: -1
    keep_alive_interval: 0s
    initial_stream_window: 2GiB
    initial_connection_window: 1KiB
    max_send_buf_size: lots
    max_concurent_streams: 5",
        )
        .unwrap_err();
        for want in [
            "gw.yaml:6:29: limits.http2.max_concurrent_streams: must be at least 1",
            "gw.yaml:7:27: limits.http2.max_header_list_size: must be between 1KiB and 16MiB",
            "limits.http2.max_pending_accept_reset_streams:",
            "limits.http2.max_local_error_reset_streams:",
            "limits.http2.keep_alive_interval: must be greater than zero",
            "limits.http2.initial_stream_window: must be between 1KiB and 1GiB",
            "limits.http2.initial_connection_window: must be between 64KiB and 1GiB",
            "limits.http2.max_send_buf_size:",
            "limits.http2.max_concurent_streams: unknown field `max_concurent_streams` (did you mean `max_concurrent_streams`?)",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let err = with("  http2: {keep_alive_timeout: 5s}").unwrap_err();
        assert!(
            err.contains(
                "limits.http2.keep_alive_timeout: needs `keep_alive_interval` (without it no PING is sent)"
            ),
            "{err}"
        );
        let err = with("  http2: 100").unwrap_err();
        assert!(err.contains("limits.http2:"), "{err}");
    }
}
