//! Several certificates per TLS listener, chosen by SNI, and certificate reloads, through the
//! real binary: certificates made at test time with rcgen, a rustls client in the test that
//! records which certificate the gateway presented, files replaced the way cert-manager and
//! certbot do (a new file renamed over the old one).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fairgate_tests::{empty, eventually, metric, run_fairgate, Client, Gateway, Upstream};
use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

const WAIT: Duration = Duration::from_secs(10);

/// Writes `NAME.pem` and `NAME-key.pem` into `dir` (each written beside and renamed over,
/// key first), a self-signed certificate for `names` valid until `until` (year); answers its
/// DER.
fn install(dir: &Path, file: &str, names: &[&str], until: i32) -> CertificateDer<'static> {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("names");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    replace(&dir.join(format!("{file}-key.pem")), &key.serialize_pem());
    replace(&dir.join(format!("{file}.pem")), &cert.pem());
    cert.der().clone()
}

/// Replaces a file as cert-manager and certbot do: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Accepts any certificate (the test checks which one it got) but still checks the
/// handshake's signatures against it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A fresh TLS connection (a new client config each time: no session resumption) with SNI
/// `name` (an IP address sends no SNI), offering `http/1.1`; answers the stream and the
/// certificate the gateway presented.
async fn handshake(
    addr: SocketAddr,
    name: &str,
) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
    let provider = Arc::new(crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    let stream = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .expect("tls handshake");
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone();
    (stream, presented)
}

/// The certificate presented for SNI `name`.
async fn presented(addr: SocketAddr, name: &str) -> CertificateDer<'static> {
    handshake(addr, name).await.1
}

/// An HTTP/1.1 connection over `stream`: a sender for requests on it.
async fn http1(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<fairgate_tests::TestBody> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(conn);
    send
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<fairgate_tests::TestBody>,
    path: &str,
) -> StatusCode {
    send.ready().await.expect("connection ready");
    let req = Request::get(path)
        .header("host", "api.test")
        .body(empty())
        .unwrap();
    send.send_request(req).await.expect("response").status()
}

fn config(up: &Upstream, certs: &[&str]) -> String {
    let certs: Vec<String> = certs
        .iter()
        .map(|c| format!("{{cert: {c}.pem, key: {c}-key.pem}}"))
        .collect();
    format!(
        "listen:
  - address: 127.0.0.1:0
    tls: {{certs: [{}]}}
admin: {{listen: 127.0.0.1:0}}
workers: 2
routes: [{{upstream: u}}]
upstreams: {{u: {{targets: ['{}']}}}}
log: {{decisions: off}}
",
        certs.join(", "),
        up.addr
    )
}

/// (reloads ok, reloads failed, last reload success) of the gateway's TLS listener.
async fn reloads(gw: &Gateway) -> (f64, f64, f64) {
    let text = Client::new().get(&gw.admin_url("/metrics")).await.text();
    let l = gw.data;
    let get = |series: String| metric(&text, &series).unwrap_or(f64::NAN);
    (
        get(format!(
            r#"fairgate_certificate_reloads_total{{listener="{l}",result="ok"}}"#
        )),
        get(format!(
            r#"fairgate_certificate_reloads_total{{listener="{l}",result="error"}}"#
        )),
        get(format!(
            r#"fairgate_certificate_last_reload_success{{listener="{l}"}}"#
        )),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_each_names_certificate_a_wildcard_and_the_default() {
    let dir = Gateway::tempdir();
    let default = install(dir.path(), "default", &["default.test"], 2100);
    let api = install(dir.path(), "api", &["api.test", "api2.test"], 2100);
    let wild = install(dir.path(), "wild", &["*.apps.test"], 2100);
    let up = Upstream::start().await;
    let gw = Gateway::start_in(dir, &config(&up, &["default", "api", "wild"]));
    let addr = gw.data;

    let cases = [
        ("api.test", &api, "a name of the second certificate"),
        ("api2.test", &api, "its other name"),
        ("default.test", &default, "the first certificate's name"),
        ("x.apps.test", &wild, "one label under the wildcard"),
        ("a.b.apps.test", &default, "two labels: not the wildcard's"),
        ("apps.test", &default, "the wildcard's apex: not its"),
        ("unknown.test", &default, "an unknown name: the default"),
        ("127.0.0.1", &default, "no SNI: the default"),
    ];
    for (name, want, why) in cases {
        assert!(
            presented(addr, name).await == *want,
            "{name}: expected {why}"
        );
    }
    // And the connection serves.
    let (stream, _) = handshake(addr, "api.test").await;
    assert_eq!(get(&mut http1(stream).await, "/").await, StatusCode::OK);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_files_reach_new_handshakes_while_open_connections_go_on() {
    let dir = Gateway::tempdir();
    install(dir.path(), "default", &["default.test"], 2100);
    let v1 = install(dir.path(), "api", &["api.test"], 2100);
    let up = Upstream::start().await;
    let gw = Gateway::start_in(dir, &config(&up, &["default", "api"]));
    let addr = gw.data;
    assert_eq!(reloads(&gw).await, (0.0, 0.0, 1.0));

    // A connection opened before the change.
    let (stream, got) = handshake(addr, "api.test").await;
    assert!(got == v1);
    let mut before = http1(stream).await;
    assert_eq!(get(&mut before, "/before").await, StatusCode::OK);

    let v2 = install(gw.dir(), "api", &["api.test"], 2100);
    assert!(v2 != v1);
    let swapped = eventually(WAIT, || async { presented(addr, "api.test").await == v2 }).await;
    assert!(
        swapped,
        "new handshakes never got the new certificate:\n{}",
        gw.stderr()
    );
    // Every new handshake from now on, on every thread.
    for _ in 0..8 {
        assert!(presented(addr, "api.test").await == v2);
    }
    // The other certificate is still served for its name.
    assert!(presented(addr, "default.test").await != v2);
    // The connection opened before keeps working.
    assert_eq!(get(&mut before, "/after").await, StatusCode::OK);
    assert_eq!(up.count(), 2);
    let (ok, failed, last) = reloads(&gw).await;
    assert!(ok >= 1.0 && last == 1.0, "{ok} {failed} {last}");
    assert!(
        gw.stderr().contains("certificates reloaded"),
        "{}",
        gw.stderr()
    );

    // SIGHUP reloads too, with no file changed.
    gw.signal("HUP");
    let counted = eventually(WAIT, || async { reloads(&gw).await.0 > ok }).await;
    assert!(
        counted,
        "SIGHUP did not reload the certificates:\n{}",
        gw.stderr()
    );
    assert!(presented(addr, "api.test").await == v2);
}

/// A bad change: what it is, how it is written, what the log must say.
type Step<'a> = (&'a str, Box<dyn Fn() + 'a>, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_certificate_keeps_the_old_one_and_says_why() {
    let dir = Gateway::tempdir();
    let good = install(dir.path(), "api", &["api.test"], 2100);
    install(dir.path(), "other", &["other.test"], 2100);
    let up = Upstream::start().await;
    let gw = Gateway::start_in(dir, &config(&up, &["api"]));
    let addr = gw.data;
    let api_pem = gw.dir().join("api.pem");
    let good_cert = std::fs::read_to_string(&api_pem).unwrap();
    let good_key = std::fs::read_to_string(gw.dir().join("api-key.pem")).unwrap();

    let other_key = std::fs::read_to_string(gw.dir().join("other-key.pem")).unwrap();
    let steps: [Step<'_>; 3] = [
        (
            "another certificate's key",
            Box::new(|| replace(&gw.dir().join("api-key.pem"), &other_key)),
            "the certificate and key cannot be used together: keys may not be consistent: KeyMismatch"
                .to_owned(),
        ),
        (
            "a certificate file that is not PEM",
            Box::new(|| replace(&api_pem, "garbage\n")),
            format!("certs[0]: `{}` holds no PEM certificate", api_pem.display()),
        ),
        (
            "an expired certificate with its own key",
            Box::new(|| {
                install(gw.dir(), "api", &["api.test"], 2021);
            }),
            format!("certs[0]: `{}` expired at 2021-01-01T00:00:00Z", api_pem.display()),
        ),
    ];
    for (what, write, says) in steps {
        let failed_before = reloads(&gw).await.1;
        write();
        let reported = eventually(WAIT, || async {
            gw.stderr().contains(&says) && reloads(&gw).await.1 > failed_before
        })
        .await;
        assert!(
            reported,
            "{what}: not reported as `{says}`:\n{}",
            gw.stderr()
        );
        assert!(
            gw.stderr()
                .contains("certificate reload failed; keeping the current certificates"),
            "{}",
            gw.stderr()
        );
        assert_eq!(reloads(&gw).await.2, 0.0, "{what}");
        // The old certificate is still served, and serves.
        let (stream, got) = handshake(addr, "api.test").await;
        assert!(
            got == good,
            "{what}: the old certificate is no longer served"
        );
        assert_eq!(get(&mut http1(stream).await, "/").await, StatusCode::OK);
    }

    // Good files again: the reload succeeds and the gauge is back at 1.
    let ok_before = reloads(&gw).await.0;
    replace(&gw.dir().join("api-key.pem"), &good_key);
    replace(&api_pem, &good_cert);
    let recovered = eventually(WAIT, || async {
        let (ok, _, last) = reloads(&gw).await;
        ok > ok_before && last == 1.0
    })
    .await;
    assert!(recovered, "{}", gw.stderr());
    assert!(presented(addr, "api.test").await == good);
    assert!(!gw.stderr().contains("panicked"), "{}", gw.stderr());
}

#[test]
fn certificate_errors_stop_the_start_with_their_position() {
    let dir = Gateway::tempdir();
    install(dir.path(), "a", &["a.test"], 2100);
    install(dir.path(), "b", &["b.test", "a.test"], 2100);
    install(dir.path(), "old", &["old.test"], 2021);
    let d = dir.path().display().to_string();
    let cases = [
        (
            "tls: {certs: []}",
            "gateway.yaml:1:46: listen[0].tls.certs: must list at least one certificate (the first is the default)".to_owned(),
        ),
        (
            "tls: {certs: [{cert: a.pem}]}",
            "gateway.yaml:1:47: listen[0].tls.certs[0]: missing field `key`".to_owned(),
        ),
        (
            "tls: {certs: [{cert: a.pem, key: a-key.pem}, {cert: b.pem, key: b-key.pem}]}",
            format!("gateway.yaml:1:85: listen[0].tls.certs[1].cert: `{d}/b.pem` names `a.test`, which is already a name of certs[0]"),
        ),
        (
            "tls: {cert: old.pem, key: old-key.pem}",
            format!("gateway.yaml:1:45: listen[0].tls.cert: `{d}/old.pem` expired at 2021-01-01T00:00:00Z"),
        ),
    ];
    for (tls, expected) in cases {
        let path = dir.path().join("gateway.yaml");
        let yaml = format!(
            "listen: [{{address: 127.0.0.1:0, {tls}}}]\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: [builtin:echo]}}}}\n"
        );
        std::fs::write(&path, &yaml).unwrap();
        let (code, out, err) = run_fairgate(&["run", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{tls}: {out}{err}");
        assert!(err.contains(&expected), "{expected}\n{err}");
        assert!(!err.contains("fairgate listening"), "{err}");
        let (code, _, err) = run_fairgate(&["check", "--gateway", path.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(err.contains(&expected), "{expected}\n{err}");
    }
}
