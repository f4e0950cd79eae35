//! `application/problem+json` responses (RFC 9457) that the gateway itself produces:
//! 404 for unrouted requests, 405 for `CONNECT`, 502/504 for upstream failures.
//!
//! Admission rejections (403/429/503) are written by `fairgate-middleware`, not here.
//!
//! A gRPC call gets these in gRPC's terms instead ([`grpc_form`]): the same Trailers-Only
//! answer as an admission rejection (`fairgate_middleware::admission::grpc`), with the
//! `grpc-status` of the HTTP status (502/503/504 `UNAVAILABLE`, 404 and 501 `UNIMPLEMENTED`).

use bytes::Bytes;
use fairgate_middleware::admission::grpc::{self, GrpcCode};
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::body::{self, BoxError, ProxyBody};

/// Marks a response the gateway wrote itself, with its `detail` (a response extension).
#[derive(Debug, Clone, Copy)]
pub struct Problem(pub &'static str);

/// Builds a problem response. `detail` is a fixed text (no request data is echoed back).
pub fn response(status: StatusCode, detail: &'static str) -> Response<ProxyBody> {
    let title = status.canonical_reason().unwrap_or("error");
    let body = format!(
        "{{\"type\":\"about:blank\",\"title\":\"{title}\",\"status\":{},\"detail\":\"{detail}\"}}",
        status.as_u16()
    );
    let mut res = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| -> BoxError { match never {} })
            .boxed_unsync(),
    );
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res.extensions_mut().insert(Problem(detail));
    res
}

/// `res` for a gRPC call: a response the gateway wrote itself ([`response`]) becomes a
/// Trailers-Only answer (HTTP 200, `grpc-status` of its status, `grpc-message` its detail,
/// its other headers such as `retry-after` kept as metadata, no body); anything else (the
/// upstream's own answer) is passed as it is.
pub fn grpc_form(res: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(&Problem(detail)) = res.extensions().get::<Problem>() else {
        return res;
    };
    let (mut parts, _problem_body) = res.into_parts();
    let code = match parts.status {
        StatusCode::NOT_IMPLEMENTED => GrpcCode::Unimplemented,
        s => GrpcCode::of_status(s),
    };
    parts.status = StatusCode::OK;
    grpc::trailers_only(&mut parts.headers, code, detail);
    Response::from_parts(parts, body::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn problem_is_json_with_status() {
        let res = response(StatusCode::BAD_GATEWAY, "upstream connection failed");
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 502);
        assert_eq!(v["title"], "Bad Gateway");
        assert_eq!(v["detail"], "upstream connection failed");
    }

    #[tokio::test]
    async fn a_grpc_call_gets_the_problem_as_grpc_status() {
        let mut res = response(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream did not answer in time",
        );
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        let res = grpc_form(res);
        assert_eq!(res.status(), StatusCode::OK);
        let h = res.headers();
        assert_eq!(h[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "upstream did not answer in time");
        assert_eq!(h[header::RETRY_AFTER], "2");
        assert!(res
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
        let unimplemented = grpc_form(response(StatusCode::NOT_IMPLEMENTED, "no h2"));
        assert_eq!(unimplemented.headers()["grpc-status"], "12");
        // An upstream's own answer passes untouched.
        let mut own = Response::new(body::empty());
        *own.status_mut() = StatusCode::BAD_GATEWAY;
        assert_eq!(grpc_form(own).status(), StatusCode::BAD_GATEWAY);
    }
}
