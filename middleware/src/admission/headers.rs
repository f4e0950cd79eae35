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

impl HeaderSource for HttpHeaders<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        let v = match known(name) {
            Some(n) => self.0.get(n),
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
