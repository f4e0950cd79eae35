//! The tower layer stepped over `tower_test::mock`: permits released on completion, on
//! error and on a dropped future; reject delay under paused time.

mod common;

use std::future::Future as _;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use fairgate_middleware::{AdmissionLayer, Decision, Outcome, PeerAddr};
use http::{Request, Response};
use http_body_util::BodyExt;
use std::task::Poll;
use tower_test::mock;

const ONE_AT_A_TIME: &str = "version: 1
plans:
  p:
    concurrency: 1
default_plan: p
";

fn request(peer: &str) -> Request<String> {
    let mut req = Request::builder().uri("/x").body(String::new()).unwrap();
    let addr: SocketAddr = format!("{peer}:4000").parse().unwrap();
    req.extensions_mut().insert(PeerAddr(addr));
    req
}

type Mock = mock::Mock<Request<String>, Response<String>>;

type Harness = (
    mock::Spawn<fairgate_middleware::Admission<Mock>>,
    mock::Handle<Request<String>, Response<String>>,
    std::sync::Arc<fairgate_middleware::Engine>,
);

fn service(yaml: &str) -> Harness {
    let (engine, _clock, _) = engine(yaml);
    let layer = AdmissionLayer::new(engine.clone());
    let (svc, handle) = mock::spawn_layer(layer);
    (svc, handle, engine)
}

#[tokio::test]
async fn permit_released_when_the_body_completes() {
    let (mut svc, mut handle, engine) = service(ONE_AT_A_TIME);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(request("192.0.2.1"));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new("hello".to_string()));
    let resp = fut.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(engine.in_flight(), 1, "held until the body ends");
    // A second request of the same client while the body is unread: 429.
    assert!(svc.poll_ready().is_ready());
    let rejected = svc.call(request("192.0.2.1")).await.unwrap();
    assert_eq!(rejected.status(), 429);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    assert_eq!(engine.in_flight(), 0);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(request("192.0.2.1"));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(String::new()));
    let resp = fut.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(engine.in_flight(), 0, "an empty body completes at once");
}

#[tokio::test]
async fn permit_released_on_error() {
    let (mut svc, mut handle, engine) = service(ONE_AT_A_TIME);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(request("192.0.2.1"));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_error("upstream broke");
    assert!(fut.await.is_err());
    assert_eq!(engine.in_flight(), 0);
    assert_eq!(engine.client_usage("192.0.2.1").unwrap().in_flight, 0);
}

#[tokio::test]
async fn permit_released_when_the_future_is_dropped() {
    let (mut svc, mut handle, engine) = service(ONE_AT_A_TIME);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(request("192.0.2.1"));
    let _pending = handle.next_request().await.unwrap();
    assert_eq!(engine.in_flight(), 1);
    drop(fut); // the client went away
    assert_eq!(engine.in_flight(), 0);
    assert_eq!(engine.client_usage("192.0.2.1").unwrap().in_flight, 0);
    // And a dropped body, too.
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(request("192.0.2.1"));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new("unread".to_string()));
    let resp = fut.await.unwrap();
    assert_eq!(engine.in_flight(), 1);
    drop(resp);
    assert_eq!(engine.in_flight(), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn shed_rejections_wait_the_reject_delay() {
    let (mut svc, _handle, engine) = service(
        "version: 1
shedding:
  limit: {static: 1}
  reject_delay: {max: 50ms, max_waiting: 10}
",
    );
    // Teach the engine a typical success latency of 30 ms, then fill the limit.
    let r = Req::from("192.0.2.9");
    let Decision::Admit(a) = r.decide(&engine) else {
        panic!()
    };
    a.ticket.complete(Outcome {
        status: 200,
        response_bytes: 0,
        latency: Duration::from_millis(30),
    });
    let Decision::Admit(_held) = r.decide(&engine) else {
        panic!()
    };

    assert!(svc.poll_ready().is_ready());
    let mut fut = Box::pin(svc.call(request("192.0.2.1")));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    tokio::time::advance(Duration::from_millis(29)).await;
    assert!(
        fut.as_mut().poll(&mut cx).is_pending(),
        "still waiting at 29 ms"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    let Poll::Ready(Ok(resp)) = fut.as_mut().poll(&mut cx) else {
        panic!("ready at 30 ms")
    };
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_background_pruner_drops_full_buckets() {
    let (engine, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['1/s burst 5']
default_plan: free
",
    );
    assert!(admit(&engine, &Req::from("192.0.2.1")));
    assert_eq!(engine.tracked_keys(), 1);
    let pruner = engine.spawn_pruner(Duration::from_secs(1));
    clock.advance(Duration::from_secs(10)); // the bucket is full again
                                            // Poll with a deadline (virtual time) instead of sleeping for a fixed time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.tracked_keys() != 0 && tokio::time::Instant::now() < deadline {
        tokio::time::advance(Duration::from_millis(500)).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(engine.tracked_keys(), 0);
    drop(engine);
    tokio::time::advance(Duration::from_secs(2)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pruner.is_finished() && tokio::time::Instant::now() < deadline {
        tokio::time::advance(Duration::from_millis(500)).await;
        tokio::task::yield_now().await;
    }
    assert!(pruner.is_finished(), "stops once the engine is gone");
}

/// Counts completed tickets.
#[derive(Default)]
struct Completions(std::sync::atomic::AtomicU64);

impl fairgate_middleware::Observer for Completions {
    fn on_decision(&self, _: &fairgate_middleware::DecisionEvent<'_>) {}
    fn on_complete(&self, _: &fairgate_middleware::CompletionEvent<'_>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// hyper's HTTP/1 server stops polling a body once `is_end_stream()` turns true after a
/// data frame and drops it without ever seeing `None`: that must complete the ticket (feeding
/// the observer and the adaptive limiter), not merely release it.
#[tokio::test]
async fn a_body_dropped_after_its_last_frame_completes_the_ticket() {
    let (mut svc, mut handle, engine) = service(ONE_AT_A_TIME);
    let seen = std::sync::Arc::new(Completions::default());
    engine.set_observer(seen.clone());
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(request("192.0.2.1"));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new("hello".to_string()));
    let mut body = fut.await.unwrap().into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(&frame.into_data().unwrap()[..], b"hello");
    assert!(http_body::Body::is_end_stream(&body));
    drop(body);
    assert_eq!(seen.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(engine.in_flight(), 0);
}

/// One engine, two forms: the same rejection of the layer is a problem+json 429 for an
/// HTTP request and a Trailers-Only gRPC answer for a gRPC call (RESOURCE_EXHAUSTED, the
/// same `retry-after`, no body), and a deny rule is PERMISSION_DENIED.
#[tokio::test]
async fn a_grpc_call_is_rejected_in_grpcs_terms() {
    let (mut svc, mut handle, _engine) = service(
        "version: 1
plans:
  p:
    concurrency: 1
default_plan: p
rules:
  - {name: no-bots, when: {headers: [{name: x-bot, present: true}]}, action: deny}
",
    );
    let grpc = |peer: &str| {
        let mut req = request(peer);
        req.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        req
    };
    // Hold the client's one slot.
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(request("192.0.2.1"));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new("held".to_string()));
    let held = fut.await.unwrap();

    assert!(svc.poll_ready().is_ready());
    let http = svc.call(request("192.0.2.1")).await.unwrap();
    assert_eq!(http.status(), 429);
    assert_eq!(http.headers()["content-type"], "application/problem+json");
    assert!(svc.poll_ready().is_ready());
    let g = svc.call(grpc("192.0.2.1")).await.unwrap();
    assert_eq!(g.status(), 200);
    assert_eq!(g.headers()["content-type"], "application/grpc");
    assert_eq!(g.headers()["grpc-status"], "8");
    assert_eq!(
        g.headers()["grpc-message"],
        "too many requests in flight for this client"
    );
    assert_eq!(g.headers()["retry-after"], http.headers()["retry-after"]);
    assert_eq!(g.headers()["grpc-retry-pushback-ms"], "1000");
    assert!(g.into_body().collect().await.unwrap().to_bytes().is_empty());
    drop(held);

    let mut bot = grpc("192.0.2.2");
    bot.headers_mut().insert("x-bot", "1".parse().unwrap());
    assert!(svc.poll_ready().is_ready());
    let denied = svc.call(bot).await.unwrap();
    assert_eq!(denied.status(), 200);
    assert_eq!(denied.headers()["grpc-status"], "7");
    assert_eq!(
        denied.headers()["grpc-message"],
        "rule no-bots denied the request"
    );
    assert!(denied.headers().get("retry-after").is_none());
}
