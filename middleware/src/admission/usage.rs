//! The usage endpoint (`usage_endpoint` in the policy): on the data port, a client reads its
//! own quota and usage, and, with `self_caps: true`, sets or lifts its own lower caps.
//!
//! | method | what |
//! |---|---|
//! | `GET`, `HEAD` | the calling client's plan, bandwidths (`quota`, `window_seconds`, `burst`, `remaining`, `reset_seconds`: its `RateLimit-Policy` and `RateLimit` numbers), `concurrency_limit`, `in_flight`, `borrowing`, `spare_capacity`, `cap` |
//! | `PUT` | sets its cap: `{"bandwidths": {"<name>": {"quota": N, "burst": B}}, "concurrency": M}` (200 with the usage; 422 when it would raise a limit) |
//! | `DELETE` | lifts its cap |
//!
//! The client is the one its requests are charged to: the engine identifies it exactly as
//! it identifies a request ([`Engine::client_key_of`]), and nothing in the request names
//! another client. Answering costs no quota and is not a decision: no bucket, counter or
//! observer hears of it. Responses carry `Cache-Control: no-store`; errors are
//! `application/problem+json`.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use fairgate_policies::PolicyErrors;
use http::header::{HeaderName, HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::body::AdmissionBody;
use crate::engine::{CapError, ClientUsage, Engine, UsageSettings};

/// Cap bodies larger than this are refused (413).
const MAX_BODY: usize = 16 * 1024;

/// What the endpoint answers, before it becomes a response of the service's body type.
#[derive(Debug)]
pub(crate) struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Reply {
    /// Into the service's response type.
    pub(crate) fn into_response<B>(self) -> Response<AdmissionBody<B>> {
        let mut res = Response::new(AdmissionBody::full(self.body));
        *res.status_mut() = self.status;
        let h: &mut HeaderMap = res.headers_mut();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (k, v) in self.headers {
            h.insert(k, v);
        }
        res
    }

    fn json(status: StatusCode, content_type: &'static str, v: &Value) -> Reply {
        Reply {
            status,
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body: Bytes::from(v.to_string()),
        }
    }

    fn problem(status: StatusCode, detail: &str) -> Reply {
        Reply::json(
            status,
            "application/problem+json",
            &json!({
                "type": "about:blank",
                "title": status.canonical_reason().unwrap_or("error"),
                "status": status.as_u16(),
                "detail": detail,
            }),
        )
    }

    fn with(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.push((name, value));
        self
    }
}

/// A write (`PUT`, `DELETE`) that reads the body and writes the caps file first.
pub(crate) type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

/// How the endpoint answers a request: at once, or after a write.
pub(crate) enum Answer {
    Now(Reply),
    Later(Pending),
}

/// Answers `req` (sent to the usage endpoint) for the client `key`.
pub(crate) fn serve<B>(
    engine: &Arc<Engine>,
    u: &UsageSettings,
    key: String,
    req: Request<B>,
) -> Answer
where
    B: http_body::Body + Send + 'static,
{
    let allow = if u.self_caps {
        "GET, HEAD, PUT, DELETE"
    } else {
        "GET, HEAD"
    };
    match *req.method() {
        Method::GET | Method::HEAD => Answer::Now(usage(engine, u, &key)),
        Method::PUT | Method::DELETE if u.self_caps => {
            let engine = Arc::clone(engine);
            let u = u.clone();
            let put = req.method() == Method::PUT;
            Answer::Later(Box::pin(async move {
                let cap = if put {
                    let body = match read_body(req.into_body()).await {
                        Ok(b) => b,
                        Err(reply) => return reply,
                    };
                    match fairgate_policies::decode::parse_client_cap(&body, "request body") {
                        Ok(c) => Some(c),
                        Err(e) => return invalid(&e),
                    }
                } else {
                    None
                };
                let (e2, k2) = (Arc::clone(&engine), key.clone());
                match tokio::task::spawn_blocking(move || e2.set_cap(&k2, cap)).await {
                    Ok(Ok(_)) => usage(&engine, &u, &key),
                    Ok(Err(e)) => refused(e, allow),
                    Err(_) => Reply::problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the cap could not be written",
                    ),
                }
            }))
        }
        Method::PUT | Method::DELETE => Answer::Now(
            Reply::problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "clients cannot set their own caps here (usage_endpoint.self_caps is off)",
            )
            .with(ALLOW, HeaderValue::from_static(allow)),
        ),
        _ => Answer::Now(
            Reply::problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "the usage endpoint answers GET (and PUT and DELETE when self_caps is on)",
            )
            .with(ALLOW, HeaderValue::from_static(allow)),
        ),
    }
}

/// The body, up to [`MAX_BODY`] bytes.
async fn read_body<B: http_body::Body>(body: B) -> Result<Vec<u8>, Reply> {
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        match frame {
            None => return Ok(out),
            Some(Err(_)) => {
                return Err(Reply::problem(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                ))
            }
            Some(Ok(frame)) => {
                if let Ok(mut data) = frame.into_data() {
                    if out.len() + data.remaining() > MAX_BODY {
                        return Err(Reply::problem(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "a cap is at most 16 KiB of JSON",
                        ));
                    }
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        out.extend_from_slice(chunk);
                        let n = chunk.len();
                        data.advance(n);
                    }
                }
            }
        }
    }
}

/// 400 with every decoding error (`request body:line:column: path: message`).
fn invalid(errors: &PolicyErrors) -> Reply {
    let status = StatusCode::BAD_REQUEST;
    Reply::json(
        status,
        "application/problem+json",
        &json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "detail": "invalid cap: expected {\"bandwidths\": {\"<name>\": {\"quota\": N}}, \"concurrency\": M}",
            "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
    )
}

fn refused(e: CapError, allow: &'static str) -> Reply {
    match e {
        CapError::Off => Reply::problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "clients cannot set their own caps here (usage_endpoint.self_caps is off)",
        )
        .with(ALLOW, HeaderValue::from_static(allow)),
        CapError::NoFile => Reply::problem(
            StatusCode::CONFLICT,
            "the policy is not loaded from a file, so there is no caps_file to keep caps in",
        ),
        CapError::Invalid(detail) => Reply::problem(StatusCode::UNPROCESSABLE_ENTITY, &detail),
        CapError::TooMany(n) => Reply::problem(
            StatusCode::CONFLICT,
            &format!(
                "this service holds its limit of {n} self-set caps (usage_endpoint.max_caps); \
                 no new cap can be set until one is lifted"
            ),
        ),
        CapError::TooFast(wait) => {
            let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1);
            Reply::problem(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("too many cap changes on this service; retry after {secs}s"),
            )
            .with(
                RETRY_AFTER,
                HeaderValue::from(u64::try_from(secs).unwrap_or(u64::MAX)),
            )
        }
        CapError::Io(detail) => Reply::problem(StatusCode::INTERNAL_SERVER_ERROR, &detail),
    }
}

/// 200 with the client's usage.
fn usage(engine: &Engine, u: &UsageSettings, key: &str) -> Reply {
    let usage = engine.client_usage(key);
    let spare = engine.spare_capacity();
    Reply::json(
        StatusCode::OK,
        "application/json",
        &usage_json(usage.as_ref(), spare, u.self_caps),
    )
}

/// The endpoint's JSON (see docs/clients.md).
fn usage_json(u: Option<&ClientUsage>, spare: bool, self_caps: bool) -> Value {
    let Some(u) = u else {
        return json!({
            "plan": null,
            "bandwidths": [],
            "concurrency_limit": null,
            "in_flight": 0,
            "borrowing": false,
            "spare_capacity": spare,
            "cap": null,
            "growth": null,
            "self_caps": self_caps,
        });
    };
    // Over a bandwidth, its next request is admitted as borrowed while there is spare
    // capacity (never when it capped itself).
    let borrowing =
        spare && u.cap.is_none() && u.bandwidths.iter().any(|b| b.ratelimit.remaining == 0);
    json!({
        "plan": u.plan.as_deref(),
        "bandwidths": u.bandwidths.iter().map(|b| json!({
            "name": &*b.ratelimit.bandwidth,
            "plan": b.plan.as_deref(),
            "quota": b.ratelimit.quota,
            "window_seconds": b.ratelimit.window_secs,
            "burst": b.ratelimit.burst,
            "remaining": b.ratelimit.remaining,
            "reset_seconds": b.ratelimit.reset_secs,
        })).collect::<Vec<_>>(),
        "concurrency_limit": u.concurrency_limit,
        "in_flight": u.in_flight,
        "borrowing": borrowing,
        "spare_capacity": spare,
        "cap": u.cap.as_ref(),
        "growth": u.growth.map(|g| json!({"steps": g.steps, "factor": g.factor})),
        "self_caps": self_caps,
    })
}
