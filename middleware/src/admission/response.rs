//! Decisions into HTTP, in one place.
//!
//! | stage | status (policy default) | problem type |
//! |---|---|---|
//! | quota, concurrency, rule `limit` | 429 | `https://iana.org/assignments/http-problem-types#quota-exceeded` |
//! | shed (and a full state table) | 503 | `https://iana.org/assignments/http-problem-types#temporary-reduced-capacity` |
//! | rule `deny` | 403 | `about:blank` |
//!
//! Every rejection has an `application/problem+json` body with `type`, `title`,
//! `status`, `detail` and `violated-policies`, and `Retry-After` in whole seconds (not for
//! `deny`). When the rejection carries RateLimit numbers, it also has the IETF fields
//! (draft-ietf-httpapi-ratelimit-headers-10):
//! `RateLimit-Policy: "free-0";q=10;w=1` and `RateLimit: "free-0";r=0;t=1`.
//! Small `Retry-After` values are pre-rendered static header values.

use std::fmt::Write as _;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};

use super::body::AdmissionBody;
use crate::decision::{RateLimitInfo, Rejection, Stage};

/// `RateLimit-Policy`.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");
const QUOTA_TYPE: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
const CAPACITY_TYPE: &str =
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";

/// `Retry-After` values 0..=300 rendered once.
fn retry_after_value(secs: u64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| (0..=300u64).map(HeaderValue::from).collect());
    table
        .get(secs as usize)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(secs))
}

/// Writes the RateLimit fields of `info` into `headers` (used for admitted responses
/// when `ratelimit_headers: always`).
pub fn admitted_headers(headers: &mut HeaderMap, info: &RateLimitInfo) {
    let (policy, limit) = render(info);
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.insert(RATELIMIT_POLICY.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&limit) {
        headers.insert(RATELIMIT.clone(), v);
    }
}

fn render(info: &RateLimitInfo) -> (String, String) {
    let name = sf_string(&info.policy);
    let mut policy = String::with_capacity(name.len() + 24);
    let _ = write!(policy, "{name};q={};w={}", info.quota, info.window_secs);
    let mut limit = String::with_capacity(name.len() + 24);
    let _ = write!(limit, "{name};r={};t={}", info.remaining, info.reset_secs);
    (policy, limit)
}

/// A structured-field string: quoted, `"` and `\` escaped, non-printable ASCII dropped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {}
        }
    }
    out.push('"');
    out
}

/// A JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The HTTP response for a rejection.
pub fn rejection_response<B>(r: &Rejection) -> Response<AdmissionBody<B>> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let (problem_type, title) = match r.stage {
        Stage::Shed => (CAPACITY_TYPE, "temporary reduced capacity"),
        Stage::Rule if r.bandwidth.is_none() => ("about:blank", "request denied"),
        _ => (QUOTA_TYPE, "quota exceeded"),
    };
    let mut body = String::with_capacity(256);
    body.push_str("{\"type\":");
    json_string(&mut body, problem_type);
    body.push_str(",\"title\":");
    json_string(&mut body, title);
    let _ = write!(body, ",\"status\":{}", status.as_u16());
    body.push_str(",\"detail\":");
    let mut detail = String::with_capacity(96);
    match r.stage {
        Stage::Rule => {
            let _ = write!(detail, "rule {} ", r.rule.as_deref().unwrap_or("?"));
            detail.push_str(if r.bandwidth.is_some() {
                "rate limit exceeded"
            } else {
                "denied the request"
            });
        }
        Stage::Quota => {
            let _ = write!(
                detail,
                "quota {} exceeded",
                r.bandwidth.as_deref().unwrap_or("?")
            );
        }
        Stage::Concurrency => detail.push_str("too many requests in flight for this client"),
        Stage::Shed => detail.push_str("the service is shedding load"),
    }
    if let Some(ra) = r.retry_after {
        let _ = write!(detail, "; retry after {}s", ra.as_secs());
    }
    json_string(&mut body, &detail);
    body.push_str(",\"violated-policies\":[");
    let violated = r.bandwidth.as_deref().or(r.rule.as_deref());
    if let Some(name) = violated {
        json_string(&mut body, name);
    }
    body.push_str("]}");

    let mut response = Response::new(AdmissionBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, PROBLEM_JSON);
    if let Some(ra) = r.retry_after {
        headers.insert(RETRY_AFTER, retry_after_value(ra.as_secs().max(1)));
    }
    if let Some(info) = &r.ratelimit {
        admitted_headers(headers, info);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify::ClientKey;
    use http_body::Body as _;
    use std::sync::Arc;
    use std::time::Duration;

    fn rejection(stage: Stage, status: u16) -> Rejection {
        Rejection {
            status,
            stage,
            rule: Some(Arc::from("bad-bots")),
            plan: Some(Arc::from("free")),
            bandwidth: (stage == Stage::Quota).then(|| Arc::from("free-0")),
            client_key: ClientKey::new("k"),
            retry_after: (stage != Stage::Rule).then_some(Duration::from_secs(3)),
            ratelimit: (stage == Stage::Quota).then(|| RateLimitInfo {
                policy: Arc::from("free-0"),
                quota: 10,
                window_secs: 1,
                remaining: 0,
                reset_secs: 1,
            }),
            delay: None,
            delay_guard: None,
            shadow_hits: 0,
        }
    }

    fn body_of(r: Response<AdmissionBody<String>>) -> String {
        let mut body = r.into_body();
        let mut out = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        while let std::task::Poll::Ready(Some(Ok(f))) =
            std::pin::Pin::new(&mut body).poll_frame(&mut cx)
        {
            if let Some(d) = f.data_ref() {
                out.extend_from_slice(d);
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn quota_rejection_has_all_the_fields() {
        let r = rejection_response::<String>(&rejection(Stage::Quota, 429));
        assert_eq!(r.status(), 429);
        let h = r.headers();
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h["content-type"], "application/problem+json");
        assert_eq!(h["ratelimit-policy"], "\"free-0\";q=10;w=1");
        assert_eq!(h["ratelimit"], "\"free-0\";r=0;t=1");
        let body = body_of(r);
        assert_eq!(
            body,
            "{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\
             \"title\":\"quota exceeded\",\"status\":429,\
             \"detail\":\"quota free-0 exceeded; retry after 3s\",\
             \"violated-policies\":[\"free-0\"]}"
        );
    }

    #[test]
    fn shed_and_deny() {
        let r = rejection_response::<String>(&rejection(Stage::Shed, 503));
        assert_eq!(r.status(), 503);
        assert!(r.headers().get("ratelimit").is_none());
        assert!(body_of(r).contains("temporary-reduced-capacity"));
        let r = rejection_response::<String>(&rejection(Stage::Rule, 403));
        assert_eq!(r.status(), 403);
        assert!(r.headers().get("retry-after").is_none());
        assert!(body_of(r).contains("\"violated-policies\":[\"bad-bots\"]"));
    }

    #[test]
    fn names_are_escaped() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\n");
        assert_eq!(s, "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(sf_string("x\"y"), "\"x\\\"y\"");
    }
}
