//! Rejections in gRPC's terms.
//!
//! A gRPC client maps an HTTP status only coarsely (429 and 503 both become `UNAVAILABLE`,
//! 403 `PERMISSION_DENIED`) and reads no problem body, so a request whose `content-type` is
//! `application/grpc` (or `application/grpc+proto`, `application/grpc;…`) is answered as a
//! gRPC server would: a *Trailers-Only* response — HTTP 200, `content-type:
//! application/grpc`, `grpc-status` and `grpc-message` in the one header block, no body (so
//! HTTP/2 sends a single HEADERS frame with END_STREAM). The rejection's other headers stay,
//! and so reach the client as metadata: `retry-after` (seconds, as for HTTP),
//! `ratelimit-policy` and `ratelimit`; a retryable rejection also carries
//! `grpc-retry-pushback-ms` (gRFC A6: the delay a gRPC client with a retry policy waits).
//!
//! | stage | HTTP | `grpc-status` |
//! |---|---|---|
//! | quota, concurrency, rule `limit` | 429 | `RESOURCE_EXHAUSTED` (8) |
//! | shed, backend | 503 | `UNAVAILABLE` (14) |
//! | rule `deny` | 403 | `PERMISSION_DENIED` (7) |
//!
//! gRPC-Web (`application/grpc-web…`) is not treated as gRPC: its clients read trailers from
//! the body, and its rejections keep the HTTP form.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};

use super::body::AdmissionBody;
use crate::decision::{Rejection, Stage};

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-retry-pushback-ms`: the delay a client's retry policy should wait (gRFC A6).
pub static GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// The gRPC status codes fairgate answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GrpcCode {
    /// 2: an error without a better code.
    Unknown = 2,
    /// 4: the deadline passed.
    DeadlineExceeded = 4,
    /// 7: a deny rule refused the call.
    PermissionDenied = 7,
    /// 8: a quota (or a rule's limit, or the concurrency quota) is used up.
    ResourceExhausted = 8,
    /// 12: nothing here serves this call.
    Unimplemented = 12,
    /// 14: the service cannot answer now (shedding, the upstream failed); retryable.
    Unavailable = 14,
}

impl GrpcCode {
    /// The code of a rejection, by the stage that rejected.
    pub fn of_rejection(r: &Rejection) -> GrpcCode {
        match r.stage {
            Stage::Rule if r.bandwidth.is_none() => GrpcCode::PermissionDenied,
            Stage::Rule | Stage::Quota | Stage::Concurrency => GrpcCode::ResourceExhausted,
            Stage::Shed | Stage::Backend => GrpcCode::Unavailable,
        }
    }

    /// The code of an HTTP error a proxy answers itself (gRPC's HTTP-to-gRPC mapping, with
    /// 429 and 413 as `RESOURCE_EXHAUSTED` and 408 as `DEADLINE_EXCEEDED`).
    pub fn of_status(status: StatusCode) -> GrpcCode {
        match status.as_u16() {
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            408 => GrpcCode::DeadlineExceeded,
            413 | 429 => GrpcCode::ResourceExhausted,
            502..=504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }

    fn value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            GrpcCode::Unknown => "2",
            GrpcCode::DeadlineExceeded => "4",
            GrpcCode::PermissionDenied => "7",
            GrpcCode::ResourceExhausted => "8",
            GrpcCode::Unimplemented => "12",
            GrpcCode::Unavailable => "14",
        })
    }
}

/// Whether a request is a gRPC call: `content-type` is `application/grpc`, or
/// `application/grpc+SUBTYPE`, or either with parameters.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let prefix = b"application/grpc";
    ct.len() >= prefix.len()
        && ct[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(ct.get(prefix.len()), None | Some(b'+' | b';'))
}

/// Turns `headers` into a Trailers-Only answer's: `content-type: application/grpc`,
/// `grpc-status: code`, `grpc-message: message` (percent-encoded as gRPC asks), any
/// `content-length` removed. The caller sets the status to 200 and sends no body.
pub fn trailers_only(headers: &mut HeaderMap, code: GrpcCode, message: &str) {
    headers.insert(CONTENT_TYPE, APPLICATION_GRPC);
    headers.remove(http::header::CONTENT_LENGTH);
    headers.insert(GRPC_STATUS.clone(), code.value());
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(percent_encode(message))) {
        headers.insert(GRPC_MESSAGE.clone(), v);
    }
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(s: &str) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    out
}

/// The rejection's message: what its problem body's `detail` says, without the retry part
/// (that is in `retry-after` and `grpc-retry-pushback-ms`).
fn message(r: &Rejection) -> String {
    match r.stage {
        Stage::Rule => format!(
            "rule {} {}",
            r.rule.as_deref().unwrap_or("?"),
            if r.bandwidth.is_some() {
                "rate limit exceeded"
            } else {
                "denied the request"
            }
        ),
        Stage::Quota => format!("quota {} exceeded", r.bandwidth.as_deref().unwrap_or("?")),
        Stage::Concurrency => "too many requests in flight for this client".to_owned(),
        Stage::Shed => "the service is shedding load".to_owned(),
        Stage::Backend => "the state backend holding this quota is unavailable".to_owned(),
    }
}

/// The gRPC answer to a rejection: the HTTP form's headers (`retry-after`, RateLimit
/// fields) as metadata, `grpc-status` by stage, and no body. Same engine, same numbers:
/// only the form differs from [`super::rejection_response`].
pub fn grpc_rejection_response<B>(r: &Rejection) -> Response<AdmissionBody<B>> {
    let http = super::rejection_response::<B>(r);
    let (mut parts, _problem_body) = http.into_parts();
    parts.status = StatusCode::OK;
    trailers_only(&mut parts.headers, GrpcCode::of_rejection(r), &message(r));
    if let Some(retry) = r.retry_after {
        let ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX).max(1);
        if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
            parts.headers.insert(GRPC_RETRY_PUSHBACK_MS.clone(), v);
        }
    }
    Response::from_parts(parts, AdmissionBody::rejection(Bytes::new(), r.stage))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::RateLimitInfo;
    use crate::identify::ClientKey;
    use http_body::Body as _;
    use std::sync::Arc;
    use std::time::Duration;

    fn rejection(stage: Stage, bandwidth: bool) -> Rejection {
        Rejection {
            status: match stage {
                Stage::Rule if !bandwidth => 403,
                Stage::Shed | Stage::Backend => 503,
                _ => 429,
            },
            stage,
            rule: Some(Arc::from("bad-bots")),
            plan: Some(Arc::from("free")),
            bandwidth: bandwidth.then(|| Arc::from("free-0")),
            client_key: ClientKey::new("k"),
            retry_after: (bandwidth || stage == Stage::Shed).then_some(Duration::from_millis(2500)),
            ratelimit: (stage == Stage::Quota).then(|| RateLimitInfo {
                bandwidth: Arc::from("free-0"),
                quota: 10,
                window_secs: 1,
                burst: 20,
                remaining: 0,
                reset_secs: 3,
                bandwidths: None,
            }),
            delay: None,
            delay_guard: None,
            shadow_hits: 0,
        }
    }

    #[test]
    fn recognises_grpc_content_types() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_grpc(&m)
        };
        assert!(h("application/grpc"));
        assert!(h("application/grpc+proto"));
        assert!(h("Application/GRPC; charset=utf-8"));
        assert!(!h("application/grpc-web"));
        assert!(!h("application/grpc-web+proto"));
        assert!(!h("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn a_quota_rejection_is_resource_exhausted_with_its_retry_delay() {
        let r = grpc_rejection_response::<String>(&rejection(Stage::Quota, true));
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["grpc-message"], "quota free-0 exceeded");
        // The same delay: whole seconds as in the HTTP form, and in milliseconds.
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["grpc-retry-pushback-ms"], "2500");
        assert_eq!(h["ratelimit"], "\"free-0\";r=0;t=3");
        assert!(h.get("content-length").is_none());
        // Trailers-Only: no body at all.
        assert!(r.body().is_end_stream());
        assert_eq!(r.body().rejected_by(), Some(Stage::Quota));
    }

    #[test]
    fn deny_shed_and_rule_limits_have_their_codes() {
        let deny = grpc_rejection_response::<String>(&rejection(Stage::Rule, false));
        assert_eq!(deny.headers()["grpc-status"], "7");
        assert_eq!(
            deny.headers()["grpc-message"],
            "rule bad-bots denied the request"
        );
        assert!(deny.headers().get("grpc-retry-pushback-ms").is_none());
        let shed = grpc_rejection_response::<String>(&rejection(Stage::Shed, false));
        assert_eq!(shed.headers()["grpc-status"], "14");
        let limit = grpc_rejection_response::<String>(&rejection(Stage::Rule, true));
        assert_eq!(limit.headers()["grpc-status"], "8");
        let conc = grpc_rejection_response::<String>(&rejection(Stage::Concurrency, false));
        assert_eq!(conc.headers()["grpc-status"], "8");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b%c\né"), b"a b%25c%0A%C3%A9");
        let mut h = HeaderMap::new();
        trailers_only(
            &mut h,
            GrpcCode::of_status(StatusCode::GATEWAY_TIMEOUT),
            "50% late",
        );
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "50%25 late");
        assert_eq!(
            GrpcCode::of_status(StatusCode::NOT_FOUND),
            GrpcCode::Unimplemented
        );
        assert_eq!(
            GrpcCode::of_status(StatusCode::IM_A_TEAPOT),
            GrpcCode::Unknown
        );
    }
}
