//! [`HttpHeaders`]: the engine's header lookup over an `http::HeaderMap`.

use std::ops::ControlFlow;

use fairgate_policies::compiled::HeaderSource;
use http::header::{self, HeaderName};
use http::HeaderMap;

use crate::identify::HeaderValues;

/// Adapts an `http::HeaderMap` for [`crate::RequestFacts::headers`]. Values that are not
/// visible ASCII are treated as absent.
#[derive(Debug, Clone, Copy)]
pub struct HttpHeaders<'a>(pub &'a HeaderMap);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The header names the engine reads on every request, as constants: looking up by a
/// `HeaderName` skips parsing the name.
fn known(name: &str) -> Option<&'static HeaderName> {
    Some(match name {
        "user-agent" => &header::USER_AGENT,
        "x-forwarded-for" => &X_FORWARDED_FOR,
        "forwarded" => &header::FORWARDED,
        "authorization" => &header::AUTHORIZATION,
        "host" => &header::HOST,
        _ => return None,
    })
}

/// Up to this many header values, a lookup by a name that is not a constant scans the map
/// instead of `HeaderMap::get(&str)`, which parses, lower-cases and hashes the name first
/// (≈ 300 instructions per lookup under callgrind, and the engine looks up a policy's
/// header names several times per request). A request's few headers compare faster
/// than that; a long header list falls back to the hashed lookup.
const SCAN_MAX: usize = 24;

impl HeaderSource for HttpHeaders<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        let v = match known(name) {
            Some(n) => self.0.get(n),
            None if self.0.len() <= SCAN_MAX => self
                .0
                .iter()
                // `HeaderName`s are lower case; `name` may not be (`get` folds it too).
                // The first value of a name comes first in iteration order, as `get`'s.
                // A policy's names are usually lower case already: one `memcmp` settles
                // those, where folding every byte of both sides cost ≈ 40 % of a
                // lookup under callgrind.
                .find(|(k, _)| {
                    let k = k.as_str();
                    k == name || k.eq_ignore_ascii_case(name)
                })
                .map(|(_, v)| v),
            None => self.0.get(name),
        };
        v.and_then(|v| v.to_str().ok())
    }
}

impl HeaderValues for HttpHeaders<'_> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str) -> ControlFlow<()>) {
        let values = match known(name) {
            Some(n) => self.0.get_all(n),
            None => self.0.get_all(name),
        };
        for v in values {
            // An unreadable value still takes its place in the list, as garbage: the
            // forwarding walk must stop there rather than skip it.
            let text = v.to_str().unwrap_or("\u{0}");
            if f(text).is_break() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn lookups_agree_with_header_map_get_for_short_and_long_maps() {
        let mut pairs = vec![
            ("x-api-key", "k1"),
            ("x-api-key", "k2"),
            ("user-agent", "ua"),
            ("x-internal", "1"),
        ];
        let short = map(&pairs);
        let filler: Vec<String> = (0..SCAN_MAX).map(|i| format!("x-filler-{i}")).collect();
        pairs.extend(filler.iter().map(|f| (f.as_str(), "v")));
        let long = map(&pairs);
        assert!(short.len() <= SCAN_MAX && long.len() > SCAN_MAX);
        for m in [&short, &long] {
            let h = HttpHeaders(m);
            for name in [
                "x-api-key",
                "X-Api-Key",
                "user-agent",
                "x-internal",
                "x-none",
                "x-filler-3",
            ] {
                assert_eq!(
                    h.header(name),
                    m.get(name).and_then(|v| v.to_str().ok()),
                    "{name}"
                );
            }
            assert_eq!(h.header("x-api-key"), Some("k1"));
        }
    }

    #[test]
    fn unreadable_values_are_absent() {
        let mut m = HeaderMap::new();
        m.insert("x-bin", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(HttpHeaders(&m).header("x-bin"), None);
    }
}
