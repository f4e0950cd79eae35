//! `application/problem+json` responses (RFC 9457) that the gateway itself produces:
//! 404 for unrouted requests, 405 for `CONNECT`, 502/504 for upstream failures.
//!
//! Admission rejections (403/429/503) are written by `fairgate-middleware`, not here.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::body::{BoxError, ProxyBody};

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
    res
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
}
