//! gRPC through the real binary: a tonic server on 127.0.0.1 (h2c, and h2 over TLS with
//! ALPN) behind the gateway, a tonic client in front of it. Unary and server-streaming calls
//! pass with their metadata and trailers; rejections come back as gRPC statuses
//! (`RESOURCE_EXHAUSTED` with the retry delay, `PERMISSION_DENIED`, `UNAVAILABLE`); a client
//! that cancels mid-stream leaves nothing in flight; HTTP/2 trailers pass both ways.
//!
//! The service and its messages are written by hand (prost derive, tonic's codec and server
//! helpers): no `.proto` build, so no `protoc`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use fairgate_tests::{eventually, metric, Client, Gateway, DEADLINE};
use futures_util::Stream;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tonic::codec::ProstCodec;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    text: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send>>;
type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

/// What the test server shares with the test.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    /// Server streams dropped before their end (the client's cancel reached the server).
    cancelled: AtomicUsize,
    /// Connections accepted.
    connections: AtomicUsize,
}

/// `test.Echo/Unary`: echoes `text`, and the `x-meta` request metadata as response metadata.
#[derive(Clone)]
struct Unary(Arc<Seen>);

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = BoxFuture<tonic::Response<EchoReply>>;

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let meta = req.metadata().get("x-meta").cloned();
            let mut res = tonic::Response::new(EchoReply {
                text: req.into_inner().text,
            });
            if let Some(m) = meta {
                res.metadata_mut().insert("x-meta-echo", m);
            }
            Ok(res)
        })
    }
}

/// Counts a server stream dropped before it ended.
struct DropGuard(Arc<Seen>, bool);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// `test.Echo/Stream`: `count` replies, then trailers with `x-trailer: done`; with
/// `count == 0`, one reply and then nothing (a stream that never ends, for cancels).
#[derive(Clone)]
struct ServerStream(Arc<Seen>);

impl tonic::server::ServerStreamingService<EchoRequest> for ServerStream {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<tonic::Response<ReplyStream>>;

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        let seen = self.0.clone();
        seen.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let EchoRequest { text, count } = req.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let mut guard = DropGuard(seen, false);
                if count == 0 {
                    let _ = tx
                        .send(Ok(EchoReply {
                            text: format!("{text} 0"),
                        }))
                        .await;
                    // Wait for the receiver to go away (the call was cancelled).
                    tx.closed().await;
                    return;
                }
                for i in 0..count {
                    if tx
                        .send(Ok(EchoReply {
                            text: format!("{text} {i}"),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                guard.1 = true;
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert("x-trailer", MetadataValue::from_static("done"));
                let _ = tx.send(Err(Status::with_metadata(Code::Ok, "", md))).await;
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Ok(tonic::Response::new(Box::pin(stream) as ReplyStream))
        })
    }
}

/// A tonic gRPC server on 127.0.0.1, over h2c or (with a rustls config) h2 over TLS.
struct GrpcServer {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn route(
    seen: Arc<Seen>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
    Ok(match req.uri().path() {
        "/test.Echo/Stream" => grpc.server_streaming(ServerStream(seen), req).await,
        _ => grpc.unary(Unary(seen), req).await,
    })
}

impl GrpcServer {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = shared.clone();
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| route(seen.clone(), req));
                    let builder = auto::Builder::new(TokioExecutor::new()).http2_only();
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        GrpcServer { addr, seen, task }
    }
}

type GrpcClient = tonic::client::Grpc<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
>;

/// A tonic client of the gateway's data port (HTTP/2 with prior knowledge).
fn client(gw: &Gateway) -> GrpcClient {
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin: Uri = format!("http://{}", gw.data).parse().unwrap();
    tonic::client::Grpc::with_origin(http, origin)
}

async fn unary(
    c: &mut GrpcClient,
    text: &str,
    meta: &[(&'static str, &str)],
) -> Result<tonic::Response<EchoReply>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let mut req = tonic::Request::new(EchoRequest {
        text: text.to_owned(),
        count: 0,
    });
    for (k, v) in meta {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    c.unary(
        req,
        PathAndQuery::from_static("/test.Echo/Unary"),
        ProstCodec::default(),
    )
    .await
}

async fn server_stream(
    c: &mut GrpcClient,
    text: &str,
    count: u32,
) -> Result<tonic::Response<tonic::codec::Streaming<EchoReply>>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let req = tonic::Request::new(EchoRequest {
        text: text.to_owned(),
        count,
    });
    c.server_streaming(
        req,
        PathAndQuery::from_static("/test.Echo/Stream"),
        ProstCodec::default(),
    )
    .await
}

fn config(up: SocketAddr, protocol: &str, tls: &str, policy: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
workers: 2
routes: [{{upstream: g}}]
upstreams:
  g: {{targets: ['{up}'], protocol: {protocol}{tls}}}
log: {{decisions: off}}
policy:
  version: 1
  identify: {{client_key: [{{header: x-api-key}}]}}
{policy}"
    )
}

async fn metrics(c: &Client, gw: &Gateway) -> String {
    c.get(&gw.admin_url("/metrics")).await.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_server_streaming_calls_pass_with_metadata_and_trailers_over_h2c() {
    let up = GrpcServer::start(None).await;
    let gw = Gateway::start(&config(up.addr, "h2c", "", ""));
    let mut c = client(&gw);

    let res = unary(&mut c, "hello", &[("x-meta", "m1")])
        .await
        .expect("unary");
    assert_eq!(res.get_ref().text, "hello");
    assert_eq!(res.metadata().get("x-meta-echo").unwrap(), "m1");

    let res = server_stream(&mut c, "s", 3).await.expect("stream");
    let mut stream = res.into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.expect("a message") {
        got.push(m.text);
    }
    assert_eq!(got, ["s 0", "s 1", "s 2"]);
    let trailers = stream.trailers().await.expect("trailers").expect("some");
    assert_eq!(trailers.get("x-trailer").unwrap(), "done");
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 2);
    // One HTTP/2 connection to the upstream carried both calls (one client connection: one
    // gateway core, one pooled upstream connection of that core's client).
    assert_eq!(up.seen.connections.load(Ordering::SeqCst), 1);

    let c2 = Client::new();
    let m = metrics(&c2, &gw).await;
    assert_eq!(
        metric(
            &m,
            r#"fairgate_upstream_errors_total{upstream="g",kind="protocol"}"#
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_grpc_statuses_with_the_retry_delay() {
    let up = GrpcServer::start(None).await;
    let gw = Gateway::start(&config(
        up.addr,
        "h2c",
        "",
        "  plans: {free: {bandwidths: ['1/min burst 2']}}
  default_plan: free
  rules:
    - {name: no-bots, when: {headers: [{name: x-bot, present: true}]}, action: deny}
",
    ));
    let mut c = client(&gw);
    for i in 0..2 {
        unary(&mut c, "ok", &[("x-api-key", "k1")])
            .await
            .unwrap_or_else(|e| panic!("call {i} within the burst: {e:?}"));
    }
    let over = unary(&mut c, "over", &[("x-api-key", "k1")])
        .await
        .expect_err("over quota");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert_eq!(over.message(), "quota free-0 exceeded");
    let md = over.metadata();
    let retry: u64 = md
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // One token a minute: the next one is at most a minute away.
    assert!((1..=60).contains(&retry), "{retry}");
    let pushback: u64 = md
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The same delay: `retry-after` is its whole seconds (at least 1).
    assert!(
        pushback / 1000 == retry || (retry == 1 && pushback < 1000),
        "{pushback} ms for retry-after {retry}"
    );
    assert!(md
        .get("ratelimit")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("r=0"));

    let denied = unary(&mut c, "bot", &[("x-api-key", "k2"), ("x-bot", "yes")])
        .await
        .expect_err("denied");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(denied.message(), "rule no-bots denied the request");
    // The upstream saw only the admitted calls.
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 2);
}

/// Shedding is `UNAVAILABLE` with the retry delay: with a static limit of one request in
/// flight, a call made while a stream is open is shed; once the stream is cancelled, calls
/// pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_is_unavailable() {
    let up = GrpcServer::start(None).await;
    let gw = Gateway::start(&config(up.addr, "h2c", "", "  shedding: {limit: 1}\n"));
    let mut c = client(&gw);
    let mut open = server_stream(&mut c, "open", 0)
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(open.message().await.unwrap().unwrap().text, "open 0");
    let shed = unary(&mut c, "shed", &[]).await.expect_err("shed");
    assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");
    assert_eq!(shed.message(), "the service is shedding load");
    assert_eq!(shed.metadata().get("retry-after").unwrap(), "1");
    assert_eq!(
        shed.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "1000"
    );
    drop(open);
    let passed = eventually(DEADLINE, || {
        let mut c = c.clone();
        async move { unary(&mut c, "again", &[]).await.is_ok() }
    })
    .await;
    assert!(passed, "calls stay shed after the stream was cancelled");
}

/// The gateway's own failures are gRPC statuses too: an upstream that is gone is
/// `UNAVAILABLE`; a gRPC call to an HTTP/1.1 pool is `UNIMPLEMENTED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_failures_are_grpc_statuses() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
routes:
  - {{path_prefix: /h1.Echo/, upstream: h1}}
  - {{upstream: gone}}
upstreams:
  gone: {{targets: ['{closed}'], protocol: h2c}}
  h1: {{targets: [builtin:echo]}}
log: {{decisions: off}}
"
    ));
    let mut c = client(&gw);
    let e = unary(&mut c, "x", &[]).await.expect_err("no upstream");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(e.message(), "upstream connection failed");

    c.ready().await.unwrap();
    let e = c
        .unary::<_, EchoReply, _>(
            tonic::Request::new(EchoRequest::default()),
            PathAndQuery::from_static("/h1.Echo/Unary"),
            ProstCodec::default(),
        )
        .await
        .expect_err("an HTTP/1.1 pool");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("speaks HTTP/1.1"), "{e:?}");
}

/// A client that cancels a server stream mid-way: the cancel reaches the upstream, nothing
/// stays in flight, and the next calls work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_leaves_nothing_in_flight() {
    let up = GrpcServer::start(None).await;
    let gw = Gateway::start(&config(up.addr, "h2c", "", ""));
    let http = Client::new();
    for round in 0..3 {
        let mut c = client(&gw);
        let res = server_stream(&mut c, "endless", 0).await.expect("stream");
        let mut stream = res.into_inner();
        let first = stream.message().await.expect("first").expect("some");
        assert_eq!(first.text, "endless 0");
        let m = metrics(&http, &gw).await;
        assert_eq!(metric(&m, "fairgate_in_flight"), Some(1.0), "round {round}");
        assert_eq!(
            metric(&m, r#"fairgate_upstream_in_flight{upstream="g"}"#),
            Some(1.0),
            "round {round}"
        );
        // Cancel: the stream (and with it the HTTP/2 stream) is dropped mid-way.
        drop(stream);
        drop(c);
        let cancelled = eventually(DEADLINE, || async {
            up.seen.cancelled.load(Ordering::SeqCst) == round + 1
        })
        .await;
        assert!(
            cancelled,
            "the cancel of round {round} did not reach the upstream"
        );
        let idle = eventually(DEADLINE, || async {
            let m = metrics(&http, &gw).await;
            metric(&m, "fairgate_in_flight") == Some(0.0)
                && metric(&m, r#"fairgate_upstream_in_flight{upstream="g"}"#) == Some(0.0)
        })
        .await;
        assert!(idle, "a request stayed in flight after round {round}");
    }
    let mut c = client(&gw);
    let res = unary(&mut c, "after", &[])
        .await
        .expect("a call after the cancels");
    assert_eq!(res.get_ref().text, "after");
    let m = metrics(&http, &gw).await;
    for kind in ["connect", "protocol", "tls"] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"fairgate_upstream_errors_total{{upstream="g",kind="{kind}"}}"#)
            ),
            Some(0.0),
            "{kind}"
        );
    }
}

/// gRPC over h2 with TLS (ALPN) to the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2_with_tls_to_the_upstream() {
    let dir = Gateway::tempdir();
    let ca = rcgen::generate_simple_self_signed(vec!["grpc.internal".to_owned()]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ca.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(ca.key_pair.serialize_der().into()),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let up = GrpcServer::start(Some(Arc::new(server))).await;
    let gw = Gateway::start_in(
        dir,
        &config(
            up.addr,
            "h2",
            ", tls: {ca: ca.pem, server_name: grpc.internal}",
            "",
        ),
    );
    let mut c = client(&gw);
    let res = unary(&mut c, "secure", &[("x-meta", "m2")])
        .await
        .expect("unary over TLS");
    assert_eq!(res.get_ref().text, "secure");
    assert_eq!(res.metadata().get("x-meta-echo").unwrap(), "m2");
    let mut stream = server_stream(&mut c, "t", 2)
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().text, "t 0");
    assert_eq!(stream.message().await.unwrap().unwrap().text, "t 1");
    assert!(stream.message().await.unwrap().is_none());
    assert_eq!(
        stream
            .trailers()
            .await
            .unwrap()
            .unwrap()
            .get("x-trailer")
            .unwrap(),
        "done"
    );
}

/// Request trailers reach an h2c upstream and its response trailers come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_both_ways_over_h2c() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let te = req
                            .headers()
                            .get("te")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let host = req
                            .headers()
                            .get("host")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let collected = req.into_body().collect().await.unwrap();
                        let mut trailers = collected.trailers().cloned().unwrap_or_default();
                        trailers.insert("x-seen-te", te.parse().unwrap());
                        trailers.insert("x-seen-host", host.parse().unwrap());
                        trailers.insert("x-seen-authority", authority.parse().unwrap());
                        let body = collected.to_bytes();
                        let frames = vec![
                            Ok::<_, Infallible>(http_body::Frame::data(body)),
                            Ok(http_body::Frame::trailers(trailers)),
                        ];
                        Ok::<_, Infallible>(Response::new(StreamBody::new(
                            futures_util::stream::iter(frames),
                        )))
                    });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
routes: [{{upstream: t}}]
upstreams: {{t: {{targets: ['{addr}'], protocol: h2c}}}}
log: {{decisions: off}}
"
    ));
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-request-trailer", "r1".parse().unwrap());
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"payload"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let req = Request::post(gw.url("/t"))
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let res = http.request(req).await.expect("response");
    assert_eq!(res.status(), 200);
    let collected = res.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(trailers["x-request-trailer"], "r1");
    assert_eq!(trailers["x-seen-te"], "trailers");
    // `:authority` is the target; the client's authority goes as `host`.
    assert_eq!(trailers["x-seen-authority"], addr.to_string());
    assert_eq!(trailers["x-seen-host"], gw.data.to_string());
    assert_eq!(collected.to_bytes(), "payload");
    server.abort();
}
