//! TLS termination for data-plane listeners: loading a listener's PEM certificate chain and
//! private key into a rustls server config, and the bounded handshake.
//!
//! rustls runs with its `ring` provider (aws-lc-rs is not compiled in) and the provider's
//! safe defaults: TLS 1.3 and 1.2. ALPN offers `h2` first, then `http/1.1`; after the
//! handshake the connection goes to the same hyper-util `auto` builder as a plain one, which
//! serves HTTP/2 when the client speaks it. Requests on a TLS listener are forwarded with
//! `X-Forwarded-Proto: https`.
//!
//! A handshake that does not finish within `limits.handshake_timeout` (default 10 s) closes
//! the connection, so a client that connects and stays silent cannot hold a task.
//!
//! ```
//! # fn demo(cert: &std::path::Path, key: &std::path::Path) {
//! use std::time::Duration;
//! match fairgate_gateway::tls::Tls::from_pem_files(cert, key, Duration::from_secs(10)) {
//!     Ok(tls) => println!("{tls:?}"),
//!     // e.g. "cannot read `cert.pem`: No such file or directory (os error 2)"
//!     Err(e) => eprintln!("{e}"),
//! }
//! # }
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a listener's certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The certificate file has no `CERTIFICATE` PEM section.
    #[error("`{0}` holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key file has no private-key PEM section.
    #[error("`{0}` holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    /// A file has a broken PEM section.
    #[error("`{path}` is not valid PEM: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (the key does not match the certificate, or is unsupported).
    #[error("the certificate and key cannot be used together: {0}")]
    Config(rustls::Error),
}

impl TlsError {
    /// The file the error is about; `None` when it is about the pair.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Read { path, .. } | TlsError::Pem { path, .. } => Some(path),
            TlsError::NoCertificate(path) | TlsError::NoKey(path) => Some(path),
            TlsError::Config(_) => None,
        }
    }
}

/// Reads a PEM certificate chain (leaf first).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// Reads the first PEM private key of a file.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey(path.to_owned()),
        e => pem_error(path, e),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Builds the rustls server config of a certificate file and a key file: `ring` provider,
/// safe default protocol versions, no client authentication, ALPN `h2` then `http/1.1`.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS listener's acceptor and handshake timeout. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("alpn", &["h2", "http/1.1"])
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

// === impl Tls ===

impl Tls {
    /// Loads the certificate chain and key (see [`server_config`]).
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        handshake_timeout: Duration,
    ) -> Result<Tls, TlsError> {
        Ok(Tls::new(server_config(cert, key)?, handshake_timeout))
    }

    /// An acceptor over a ready rustls config.
    pub fn new(config: Arc<ServerConfig>, handshake_timeout: Duration) -> Tls {
        Tls {
            acceptor: TlsAcceptor::from(config),
            handshake_timeout,
        }
    }

    /// Runs the server side of the handshake on `stream`; fails with `TimedOut` when it takes
    /// longer than the handshake timeout.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(stream)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tls handshake timed out",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        /// A self-signed certificate for `localhost` and its key, as `cert.pem` / `key.pem`.
        fn new() -> Files {
            let dir = tempfile::tempdir().unwrap();
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
            Files { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    #[test]
    fn loads_a_pair_and_offers_h2_then_http1() {
        let f = Files::new();
        let config = server_config(&f.path("cert.pem"), &f.path("key.pem")).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn reports_what_is_wrong_with_the_files() {
        let f = Files::new();
        let (cert, key) = (f.path("cert.pem"), f.path("key.pem"));
        let missing = f.path("missing.pem");
        let e = server_config(&missing, &key).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().starts_with("cannot read `"), "{e}");

        std::fs::write(f.path("garbage.pem"), "not a certificate\n").unwrap();
        let e = server_config(&f.path("garbage.pem"), &key).unwrap_err();
        assert_eq!(e.path(), Some(f.path("garbage.pem").as_path()));
        assert!(e.to_string().ends_with("holds no PEM certificate"), "{e}");

        // The certificate is not a key, and the key is not a certificate.
        let e = server_config(&cert, &cert).unwrap_err();
        assert!(matches!(e, TlsError::NoKey(_)), "{e}");
        let e = server_config(&key, &key).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate(_)), "{e}");

        std::fs::write(
            f.path("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = server_config(&f.path("broken.pem"), &key).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e}");

        // Another certificate's key.
        let other = Files::new();
        let e = server_config(&cert, &other.path("key.pem")).unwrap_err();
        assert!(matches!(e, TlsError::Config(_)), "{e}");
        assert_eq!(e.path(), None);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let f = Files::new();
        let tls = Tls::from_pem_files(
            &f.path("cert.pem"),
            &f.path("key.pem"),
            Duration::from_secs(10),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The client connects and never sends a ClientHello.
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let started = tokio::time::Instant::now();
        let err = tls.accept(stream).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
