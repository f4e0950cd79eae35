//! TLS termination through the real binary: a self-signed certificate made at test time, a
//! rustls client that trusts only it, HTTP/1.1 and HTTP/2 (ALPN) to the upstream with
//! `X-Forwarded-Proto: https`, the handshake timeout, and start-up failures on unusable files.

use std::net::SocketAddr;
use std::sync::Arc;

use fairgate_tests::{empty, run_fairgate, Client, Gateway, Upstream, DEADLINE};
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// A self-signed certificate for `localhost`, written as `cert.pem` / `key.pem` into a
/// gateway temp dir.
struct SelfSigned {
    dir: Arc<tempfile::TempDir>,
    cert: CertificateDer<'static>,
}

impl SelfSigned {
    fn new() -> SelfSigned {
        let dir = Gateway::tempdir();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("generate a certificate");
        std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
        SelfSigned {
            dir,
            cert: ck.cert.der().clone(),
        }
    }

    /// A client config trusting only this certificate, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).expect("add the root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

/// A gateway with a plain listener and a TLS listener (in that order) in front of `up`.
fn config(up: &Upstream, runtime: &str, extra: &str) -> String {
    format!(
        "listen:
  - 127.0.0.1:0
  - {{address: 127.0.0.1:0, tls: {{cert: cert.pem, key: key.pem}}}}
runtime: {runtime}
workers: 2
routes: [{{upstream: u}}]
upstreams: {{u: {{targets: ['{}']}}}}
log: {{decisions: off}}
{extra}",
        up.addr
    )
}

async fn connect(tls: &TlsConnector, addr: SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    tls.connect(name, tcp).await.expect("tls handshake")
}

/// One request over a fresh TLS connection, with ALPN `alpn` (`h2` → HTTP/2, else HTTP/1.1):
/// (negotiated ALPN, status, version, body).
async fn request_over_tls(
    cert: &SelfSigned,
    addr: SocketAddr,
    alpn: &[u8],
    path: &str,
) -> (Option<Vec<u8>>, StatusCode, Version, String) {
    let stream = connect(&cert.client(&[alpn]), addr).await;
    let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(stream);
    let res = if alpn == b"h2" {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let req = Request::get(format!("https://localhost{path}"))
            .body(empty())
            .unwrap();
        send.send_request(req).await.expect("h2 request")
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("http/1.1 handshake");
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "localhost")
            .body(empty())
            .unwrap();
        send.send_request(req).await.expect("http/1.1 request")
    };
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        negotiated,
        parts.status,
        parts.version,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn serves_http1_and_h2_over_tls(runtime: &str) {
    let cert = SelfSigned::new();
    let up = Upstream::start().await;
    let gw = Gateway::start_in(cert.dir.clone(), &config(&up, runtime, ""));
    let (plain, tls) = (gw.data_addrs[0], gw.data_addrs[1]);

    let (alpn, status, version, body) = request_over_tls(&cert, tls, b"http/1.1", "/one").await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(
        (status, version, body.as_str()),
        (StatusCode::OK, Version::HTTP_11, "ok")
    );

    let (alpn, status, version, body) = request_over_tls(&cert, tls, b"h2", "/two").await;
    assert_eq!(
        alpn.as_deref(),
        Some(&b"h2"[..]),
        "the server must accept ALPN h2"
    );
    assert_eq!(
        (status, version, body.as_str()),
        (StatusCode::OK, Version::HTTP_2, "ok")
    );

    // The plain listener of the same gateway still says http.
    let r = Client::new().get(&format!("http://{plain}/three")).await;
    assert_eq!(r.status, 200);

    let got = up.requests();
    let seen: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|r| {
            (
                r.uri.as_str(),
                r.headers["x-forwarded-proto"].to_str().unwrap(),
                r.headers["host"].to_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("/one", "https", "localhost"),
            ("/two", "https", "localhost"),
            ("/three", "http", plain.to_string().as_str()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_over_tls_reach_the_upstream_as_https() {
    serves_http1_and_h2_over_tls("multi_thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_over_tls_reach_the_upstream_as_https_thread_per_core() {
    serves_http1_and_h2_over_tls("thread_per_core").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_plaintext_clients_are_disconnected() {
    let cert = SelfSigned::new();
    let up = Upstream::start().await;
    let gw = Gateway::start_in(
        cert.dir.clone(),
        &config(&up, "multi_thread", "limits: {handshake_timeout: 300ms}\n"),
    );
    let tls = gw.data_addrs[1];

    // Connects and never sends a ClientHello: closed once the handshake timeout passes
    // (well before the harness deadline).
    let mut silent = TcpStream::connect(tls).await.expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(DEADLINE, silent.read(&mut buf))
        .await
        .expect("the gateway must close a silent connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection closed, got {read:?}"
    );

    // Plain HTTP on the TLS port is a failed handshake, never an HTTP answer.
    let answer =
        fairgate_tests::raw_exchange(tls, b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n", DEADLINE)
            .await;
    assert!(!answer.starts_with("HTTP/"), "{answer:?}");

    // A client that does handshake is still served.
    let (_, status, _, _) = request_over_tls(&cert, tls, b"h2", "/after").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.count(), 1);
}

#[test]
fn unusable_certificates_stop_the_start_with_the_reason() {
    let cert = SelfSigned::new();
    let dir = cert.dir.path();
    std::fs::write(dir.join("garbage.pem"), "this is not PEM\n").unwrap();
    // (cert, key, which of them is wrong, the message after `path: `)
    let cases = [
        (
            "/nonexistent/cert.pem",
            "key.pem",
            "cert",
            "cannot read `/nonexistent/cert.pem`",
        ),
        (
            "garbage.pem",
            "key.pem",
            "cert",
            "`DIR/garbage.pem` holds no PEM certificate",
        ),
        (
            "cert.pem",
            "garbage.pem",
            "key",
            "`DIR/garbage.pem` holds no PEM private key",
        ),
    ];
    for (cert_file, key_file, culprit, message) in cases {
        let path = dir.join("gateway.yaml");
        let yaml = format!(
            "listen: [{{address: 127.0.0.1:0, tls: {{cert: '{cert_file}', key: '{key_file}'}}}}]\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: [builtin:echo]}}}}\n"
        );
        std::fs::write(&path, &yaml).unwrap();
        // The error points at the quoted value of the file that is wrong.
        let value = if culprit == "cert" {
            cert_file
        } else {
            key_file
        };
        let column = yaml.find(&format!("'{value}'")).unwrap() + 1;
        let expected = format!(
            "gateway.yaml:1:{column}: listen[0].tls.{culprit}: {}",
            message.replace("DIR", &dir.display().to_string())
        );
        let (code, out, err) = run_fairgate(&["run", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{cert_file}/{key_file}: {out}{err}");
        assert!(err.contains(&expected), "{expected}\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("fairgate listening"), "{err}");
        // `fairgate check --gateway` reports the same.
        let (code, _, err) = run_fairgate(&["check", "--gateway", path.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(err.contains(&expected), "{err}");
    }
}
