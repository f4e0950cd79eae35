//! TLS to upstreams through the real binary: certificates made with rcgen at test time (a CA,
//! a server certificate for a name and 127.0.0.1, an expired one, one for another name, a
//! client certificate), upstreams served with tokio-rustls on 127.0.0.1. A good chain answers
//! 200 (with `server_name` as SNI, or the target's IP by default, health checks included); an
//! unknown CA, an expired or wrong-name certificate is a 502 counted as `kind="tls"` with the
//! reason in the process log; an upstream that requires a client certificate accepts the
//! configured one and refuses a pool without it; bad `tls` blocks stop the start with their
//! position.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fairgate_tests::{eventually, metric, run_fairgate, Client, Gateway, DEADLINE};
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// A certificate authority of the test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `dns` names and 127.0.0.1, valid now (or, `expired`, only in 2020).
    fn leaf(&self, dns: &[&str], expired: bool, client: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, "leaf");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn der_chain(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn der_key(pem: &str) -> PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// What a TLS upstream saw: the SNI of each handshake, the requests' paths.
#[derive(Default)]
struct Seen {
    sni: Mutex<Vec<Option<String>>>,
    paths: Mutex<Vec<String>>,
}

/// An HTTPS upstream on 127.0.0.1 with `(cert, key)`; with `client_ca`, it requires a client
/// certificate issued by it. Answers 200 `secure PROTO VERSION`: the request's
/// `x-forwarded-proto` and HTTP version.
struct TlsUpstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    async fn start(leaf: &(String, String), client_ca: Option<&Ca>) -> TlsUpstream {
        Self::start_with_alpn(leaf, client_ca, &[b"h2", b"http/1.1"]).await
    }

    /// [`start`](Self::start), selecting from `alpn` only (empty: no ALPN at all).
    async fn start_with_alpn(
        leaf: &(String, String),
        client_ca: Option<&Ca>,
        alpn: &[&[u8]],
    ) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.cert.der().clone()).unwrap();
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(der_chain(&leaf.0), der_key(&leaf.1))
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, seen) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                    seen.sni.lock().unwrap().push(sni);
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                seen.paths.lock().unwrap().push(req.uri().path().to_owned());
                                let version = req.version();
                                let proto = req
                                    .headers()
                                    .get("x-forwarded-proto")
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default();
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                    "secure {proto} {version:?}"
                                )))))
                            }
                        });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream { addr, seen, task }
    }
}

async fn tls_errors(c: &Client, gw: &Gateway, upstream: &str) -> f64 {
    let m = c.get(&gw.admin_url("/metrics")).await.text();
    metric(
        &m,
        &format!(r#"fairgate_upstream_errors_total{{upstream="{upstream}",kind="tls"}}"#),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_upstream_answers_over_tls_with_the_configured_name_or_its_ip() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(&["api.internal"], false, false), None).await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let gw = Gateway::start_in(
        dir,
        &format!(
            "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{path_prefix: /named, upstream: named}}
  - {{upstream: by_ip}}
upstreams:
  named:
    targets: ['{addr}']
    tls: {{ca: ca.pem, server_name: api.internal}}
  by_ip:
    targets: ['{addr}']
    tls: {{ca: ca.pem}}
    health_check: {{interval: 50ms, path: /health}}
log: {{decisions: off}}
",
            addr = up.addr
        ),
    );
    let c = Client::new();
    let r = c.get(&gw.url("/named")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // X-Forwarded-Proto is the client's scheme, not the upstream's.
    assert_eq!(r.text(), "secure http HTTP/1.1");
    let r = c.get(&gw.url("/plain")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sni = up.seen.sni.lock().unwrap().clone();
    assert!(sni.contains(&Some("api.internal".to_owned())), "{sni:?}");
    // An IP is checked against the certificate's IP SAN; no SNI is sent for it.
    assert!(sni.contains(&None), "{sni:?}");
    // Health checks go over TLS too (the upstream speaks nothing else).
    let checked = eventually(DEADLINE, || async {
        up.seen.paths.lock().unwrap().iter().any(|p| p == "/health")
    })
    .await;
    assert!(checked, "no health check reached the TLS upstream");
    assert_eq!(tls_errors(&c, &gw, "named").await, 0.0);
    assert_eq!(tls_errors(&c, &gw, "by_ip").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handshake_is_a_502_counted_and_logged_with_its_reason() {
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let unknown = TlsUpstream::start(&other.leaf(&["api.internal"], false, false), None).await;
    let expired = TlsUpstream::start(&ca.leaf(&["api.internal"], true, false), None).await;
    let wrong_name = TlsUpstream::start(&ca.leaf(&["other.internal"], false, false), None).await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let pool = |name: &str, addr: SocketAddr| {
        format!(
            "  {name}: {{targets: ['{addr}'], tls: {{ca: ca.pem, server_name: api.internal}}}}\n"
        )
    };
    let gw = Gateway::start_in(
        dir,
        &format!(
            "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{path_prefix: /unknown, upstream: unknown}}
  - {{path_prefix: /expired, upstream: expired}}
  - {{path_prefix: /wrong, upstream: wrong}}
upstreams:
{}{}{}log: {{decisions: off}}
",
            pool("unknown", unknown.addr),
            pool("expired", expired.addr),
            pool("wrong", wrong_name.addr),
        ),
    );
    let c = Client::new();
    // (route, pool, what the process log says about it)
    let cases = [
        ("/unknown", "unknown", "UnknownIssuer"),
        ("/expired", "expired", "certificate expired"),
        (
            "/wrong",
            "wrong",
            "certificate not valid for name \"api.internal\"",
        ),
    ];
    for (path, pool, reason) in cases {
        let r = c.get(&gw.url(path)).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), "application/problem+json");
        assert_eq!(r.json()["detail"], "upstream connection failed");
        assert_eq!(tls_errors(&c, &gw, pool).await, 1.0, "{pool}");
        let logged = eventually(DEADLINE, || async {
            gw.stderr().lines().any(|l| {
                l.contains("upstream tls handshake failed")
                    && l.contains(&format!("upstream={pool}"))
                    && l.contains(reason)
            })
        })
        .await;
        assert!(
            logged,
            "{pool}: no log line with `{reason}`:\n{}",
            gw.stderr()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_requiring_a_client_certificate_accepts_the_configured_one() {
    let ca = Ca::new("test CA");
    let clients = Ca::new("client CA");
    let up = TlsUpstream::start(&ca.leaf(&["api.internal"], false, false), Some(&clients)).await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let (cert, key) = clients.leaf(&["gateway.internal"], false, true);
    std::fs::write(dir.path().join("client.pem"), cert).unwrap();
    std::fs::write(dir.path().join("client-key.pem"), key).unwrap();
    let gw = Gateway::start_in(
        dir,
        &format!(
            "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{path_prefix: /anonymous, upstream: anonymous}}
  - {{upstream: mtls}}
upstreams:
  mtls:
    targets: ['{addr}']
    tls: {{ca: ca.pem, cert: client.pem, key: client-key.pem}}
  anonymous:
    targets: ['{addr}']
    tls: {{ca: ca.pem}}
log: {{decisions: off}}
",
            addr = up.addr
        ),
    );
    let c = Client::new();
    let r = c.get(&gw.url("/with-cert")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "secure http HTTP/1.1");
    let r = c.get(&gw.url("/anonymous")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(tls_errors(&c, &gw, "anonymous").await, 1.0);
    assert_eq!(tls_errors(&c, &gw, "mtls").await, 0.0);
    let logged = eventually(DEADLINE, || async {
        gw.stderr().lines().any(|l| {
            l.contains("upstream tls handshake failed")
                && l.contains("upstream=anonymous")
                && l.contains("CertificateRequired")
        })
    })
    .await;
    assert!(logged, "{}", gw.stderr());
}

/// `protocol: h2` does not fall back to HTTP/1.1: an upstream that selects no ALPN protocol
/// fails the handshake; one that offers `h2` is spoken to in HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_pool_refuses_an_upstream_without_h2() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(&["api.internal"], false, false);
    let no_alpn = TlsUpstream::start_with_alpn(&leaf, None, &[]).await;
    let h2 = TlsUpstream::start(&leaf, None).await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let gw = Gateway::start_in(
        dir,
        &format!(
            "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{path_prefix: /old, upstream: old}}
  - {{upstream: new}}
upstreams:
  old: {{targets: ['{}'], protocol: h2, tls: {{ca: ca.pem}}}}
  new: {{targets: ['{}'], protocol: h2, tls: {{ca: ca.pem}}}}
log: {{decisions: off}}
",
            no_alpn.addr, h2.addr
        ),
    );
    let c = Client::new();
    let r = c.get(&gw.url("/old")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(tls_errors(&c, &gw, "old").await, 1.0);
    let logged = eventually(DEADLINE, || async {
        gw.stderr().lines().any(|l| {
            l.contains("upstream tls handshake failed")
                && l.contains("upstream=old")
                && l.contains("the upstream did not agree to h2 by ALPN")
        })
    })
    .await;
    assert!(logged, "{}", gw.stderr());
    let r = c.get(&gw.url("/new")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "secure http HTTP/2.0");
}

#[test]
fn bad_tls_blocks_stop_the_start_with_their_position() {
    let dir = Gateway::tempdir();
    let d = dir.path();
    std::fs::write(d.join("garbage.pem"), "not PEM at all\n").unwrap();
    let ca = Ca::new("test CA");
    std::fs::write(d.join("ca.pem"), ca.cert.pem()).unwrap();
    let (cert, _) = ca.leaf(&["x"], false, true);
    std::fs::write(d.join("client.pem"), cert).unwrap();
    // (the pool's tls/protocol text, the quoted value the error points at, the message)
    let cases: [(&str, &str, &str); 6] = [
        (
            "tls: {ca: 'missing.pem'}",
            "'missing.pem'",
            "upstreams.u.tls.ca: cannot read `DIR/missing.pem`",
        ),
        (
            "tls: {ca: 'garbage.pem'}",
            "'garbage.pem'",
            "upstreams.u.tls.ca: `DIR/garbage.pem` holds no PEM certificate",
        ),
        (
            "tls: {ca: ca.pem, cert: 'client.pem'}",
            "'client.pem'",
            "upstreams.u.tls.cert: a client `cert` needs its `key`",
        ),
        (
            "tls: {ca: ca.pem, cert: client.pem, key: 'client.pem'}",
            "'client.pem'}",
            "upstreams.u.tls.key: `DIR/client.pem` holds no PEM private key",
        ),
        (
            "tls: {ca: ca.pem, server_name: 'not a name'}",
            "'not a name'",
            "upstreams.u.tls.server_name: `not a name` is not a DNS name or an IP address",
        ),
        (
            "protocol: 'h2'",
            "'h2'",
            "upstreams.u.protocol: `h2` is HTTP/2 over TLS (ALPN): add a `tls` block, or write `h2c` for HTTP/2 without TLS",
        ),
    ];
    for (block, at, message) in cases {
        let path = d.join("gateway.yaml");
        let yaml = format!(
            "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['127.0.0.1:1'], {block}}}}}\n"
        );
        std::fs::write(&path, &yaml).unwrap();
        let column = yaml.lines().nth(2).unwrap().find(at).unwrap() + 1;
        let expected = format!(
            "gateway.yaml:3:{column}: {}",
            message.replace("DIR", &d.display().to_string())
        );
        let (code, out, err) = run_fairgate(&["run", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{block}: {out}{err}");
        assert!(err.contains(&expected), "{expected}\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        let (code, _, err) = run_fairgate(&["check", "--gateway", path.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(err.contains(&expected), "{expected}\n{err}");
    }
}

/// A target written as a name (resolved by a DNS server the test controls) is checked
/// against that name, which is sent as SNI: no `server_name` needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_name_is_the_server_name_and_the_sni() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(&["api.test"], false, false), None).await;
    let dns = fairgate_tests::dns::Dns::start().await;
    dns.set("api.test", &[std::net::Ipv4Addr::LOCALHOST]);
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let gw = Gateway::start_in(
        dir,
        &format!(
            "listen: 127.0.0.1:0
routes: [{{upstream: named}}]
upstreams:
  named: {{targets: ['api.test:{}'], tls: {{ca: ca.pem}}}}
resolver: {{nameservers: ['{}']}}
log: {{decisions: off}}
",
            up.addr.port(),
            dns.addr
        ),
    );
    let r = Client::new().get(&gw.url("/by-name")).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.stderr());
    assert_eq!(r.text(), "secure http HTTP/1.1");
    assert_eq!(
        up.seen
            .sni
            .lock()
            .unwrap()
            .first()
            .cloned()
            .flatten()
            .as_deref(),
        Some("api.test")
    );
    assert_eq!(*up.seen.paths.lock().unwrap(), ["/by-name"]);
}
