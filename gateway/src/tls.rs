//! TLS termination for data-plane listeners: a listener's certificates (PEM chain and private
//! key each), chosen per handshake by the client's SNI, swapped at run time by a reload, and
//! the bounded handshake.
//!
//! rustls runs with its `ring` provider (aws-lc-rs is not compiled in) and the provider's
//! safe defaults: TLS 1.3 and 1.2. ALPN offers `h2` first, then `http/1.1`; after the
//! handshake the connection goes to the same hyper-util `auto` builder as a plain one, which
//! serves HTTP/2 when the client speaks it. Requests on a TLS listener are forwarded with
//! `X-Forwarded-Proto: https`.
//!
//! **Which certificate.** Each certificate answers for the DNS names of its subject
//! alternative names (a wildcard `*.example.com` stands for exactly one label). A handshake
//! whose SNI is one certificate's name gets that certificate; else one whose wildcard covers
//! it; else (an unknown name, an IP address, no SNI) the first certificate, the listener's
//! default. Two certificates of a listener may not share a name (one of them could never be
//! chosen), and every certificate but the first must have a DNS name.
//!
//! **Reload.** The certificates live behind one `ArcSwap` in the listener's resolver, so
//! [`Tls::reload`] re-reads every file, checks them as the start does, and swaps the whole
//! set at once; a handshake reads it with one `load`, and connections already established
//! are not touched. A set that does not load (unreadable, no PEM, a key that does not match,
//! an expired certificate, a duplicate name) is refused and the current one stays.
//!
//! A handshake that does not finish within `limits.handshake_timeout` (default 10 s) closes
//! the connection, so a client that connects and stays silent cannot hold a task.
//!
//! ```
//! # fn demo(cert: &std::path::Path, key: &std::path::Path) {
//! use std::time::Duration;
//! use fairgate_gateway::tls::{CertificateFiles, Tls};
//! let files = vec![CertificateFiles { cert: cert.into(), key: key.into() }];
//! match Tls::load(files, Duration::from_secs(10)) {
//!     Ok(tls) => println!("{tls:?}"),
//!     // e.g. "certs[0]: cannot read `cert.pem`: No such file or directory (os error 2)"
//!     Err(e) => eprintln!("{e}"),
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use fairgate_policies::units::Timestamp;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// One certificate of a listener: its PEM files (`{cert, key}` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

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
    /// The leaf certificate is not an X.509 certificate rustls' parser accepts.
    #[error("`{path}` is not a usable X.509 certificate: {message}")]
    X509 {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The leaf certificate's validity ended (`notAfter`) before now.
    #[error("`{path}` expired at {not_after}")]
    Expired {
        /// The file.
        path: PathBuf,
        /// Its `notAfter`.
        not_after: Timestamp,
    },
    /// A certificate other than the first has no DNS name, so no SNI could choose it.
    #[error(
        "`{0}` has no DNS name in its subject alternative names, so no SNI can choose it (only \
         the first certificate, the default, may have none)"
    )]
    NoName(PathBuf),
    /// A name is also a name of an earlier certificate of the listener.
    #[error("`{path}` names `{name}`, which is already a name of certs[{first}]")]
    DuplicateName {
        /// The file of the later certificate.
        path: PathBuf,
        /// The name (a wildcard as written).
        name: String,
        /// The index of the earlier certificate.
        first: usize,
    },
    /// The listener's list of certificates is empty.
    #[error("a TLS listener needs at least one certificate")]
    Empty,
    /// rustls refused the pair (the key does not match the certificate, or is unsupported).
    #[error("the certificate and key cannot be used together: {0}")]
    Config(rustls::Error),
}

impl TlsError {
    /// The file the error is about; `None` when it is about the pair.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Read { path, .. }
            | TlsError::Pem { path, .. }
            | TlsError::X509 { path, .. }
            | TlsError::Expired { path, .. }
            | TlsError::DuplicateName { path, .. } => Some(path),
            TlsError::NoCertificate(path) | TlsError::NoKey(path) | TlsError::NoName(path) => {
                Some(path)
            }
            TlsError::Config(_) | TlsError::Empty => None,
        }
    }
}

/// A [`TlsError`] about the certificate at `index` of a listener's list.
#[derive(Debug, thiserror::Error)]
#[error("certs[{index}]: {source}")]
pub struct CertificateError {
    /// The certificate's index in the listener's `certs` (0 for the `{cert, key}` form).
    pub index: usize,
    /// Why.
    #[source]
    pub source: TlsError,
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One loaded certificate: what the handshake sends, and the names it answers for.
struct Loaded {
    key: Arc<CertifiedKey>,
    /// DNS names of the leaf's subject alternative names, lowercase, wildcards as written.
    names: Vec<String>,
}

/// Loads one certificate: the chain, the key (which must match the leaf), the leaf's names,
/// and refuses it if it expired before `now`.
fn load_one(files: &CertificateFiles, now: SystemTime) -> Result<Loaded, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let x509 = |message: String| TlsError::X509 {
        path: files.cert.clone(),
        message,
    };
    let (names, not_after) = {
        let leaf = webpki::EndEntityCert::try_from(&certs[0]).map_err(|e| x509(e.to_string()))?;
        let names: Vec<String> = leaf
            .valid_dns_names()
            .map(str::to_ascii_lowercase)
            .collect();
        let not_after = der::not_after(&certs[0])
            .ok_or_else(|| x509("its validity cannot be read".to_owned()))?;
        (names, not_after)
    };
    if not_after < Timestamp::from_system_time(now) {
        return Err(TlsError::Expired {
            path: files.cert.clone(),
            not_after,
        });
    }
    let key = CertifiedKey::from_der(certs, key, &provider()).map_err(TlsError::Config)?;
    Ok(Loaded {
        key: Arc::new(key),
        names,
    })
}

/// A listener's certificates, ready for the handshake: which one answers which SNI.
pub struct Certificates {
    /// In the configured order; the first is the default.
    keys: Vec<Arc<CertifiedKey>>,
    /// Exact DNS name → index.
    exact: HashMap<String, usize>,
    /// `*.example.com` → index, keyed by `example.com`.
    wildcard: HashMap<String, usize>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("count", &self.keys.len())
            .field("exact", &self.exact)
            .field("wildcard", &self.wildcard)
            .finish()
    }
}

impl Certificates {
    /// Loads every certificate of `files` (the first is the default; an empty list is an
    /// error) as of `now`, and indexes their names.
    pub fn load(files: &[CertificateFiles], now: SystemTime) -> Result<Self, CertificateError> {
        if files.is_empty() {
            return Err(CertificateError {
                index: 0,
                source: TlsError::Empty,
            });
        }
        let mut set = Certificates {
            keys: Vec::with_capacity(files.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (index, f) in files.iter().enumerate() {
            let at = |source| CertificateError { index, source };
            let loaded = load_one(f, now).map_err(at)?;
            if index > 0 && loaded.names.is_empty() {
                return Err(at(TlsError::NoName(f.cert.clone())));
            }
            for name in &loaded.names {
                let (table, key) = match name.strip_prefix("*.") {
                    Some(rest) => (&mut set.wildcard, rest),
                    None => (&mut set.exact, name.as_str()),
                };
                match table.get(key) {
                    Some(&first) if first != index => {
                        return Err(at(TlsError::DuplicateName {
                            path: f.cert.clone(),
                            name: name.clone(),
                            first,
                        }))
                    }
                    Some(_) => {}
                    None => {
                        table.insert(key.to_owned(), index);
                    }
                }
            }
            set.keys.push(loaded.key);
        }
        Ok(set)
    }

    /// How many certificates.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a listener has at least one certificate.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The index of the certificate for SNI `name`: an exact name, else a wildcard covering
    /// its first label, else 0 (also without SNI).
    pub fn choose(&self, name: Option<&str>) -> usize {
        let Some(name) = name else { return 0 };
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(&i) = self.exact.get(name) {
            return i;
        }
        name.split_once('.')
            .and_then(|(label, rest)| {
                (!label.is_empty())
                    .then(|| self.wildcard.get(rest).copied())
                    .flatten()
            })
            .unwrap_or(0)
    }
}

/// The listener's certificate resolver: the current [`Certificates`], swapped whole.
#[derive(Debug)]
struct Resolver {
    current: ArcSwap<Certificates>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        Some(set.keys[set.choose(hello.server_name())].clone())
    }
}

/// Reads a leaf certificate's `notAfter` from its DER. Enough DER for one path through
/// `Certificate → TBSCertificate → validity` (webpki has already parsed the certificate, but
/// does not expose its validity).
mod der {
    use fairgate_policies::units::Timestamp;

    /// The content of the element of tag `tag` at the start of `input`, and what follows it.
    fn item(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = input.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (bytes, tail) = rest.split_at(n);
            rest = tail;
            bytes.iter().fold(0usize, |a, &b| (a << 8) | usize::from(b))
        };
        (rest.len() >= len).then(|| rest.split_at(len))
    }

    /// A `Time` (UTCTime or GeneralizedTime, `Z` form, as RFC 5280 requires).
    fn time(input: &[u8]) -> Option<(Timestamp, &[u8])> {
        let (&tag, _) = input.split_first()?;
        let (content, rest) = item(input, tag)?;
        let text = std::str::from_utf8(content).ok()?;
        let digits = text.strip_suffix('Z')?;
        let full = match (tag, digits.len()) {
            // UTCTime: YY ≥ 50 is 19YY (RFC 5280 4.1.2.5.1).
            (0x17, 12) => {
                let yy: u32 = digits[..2].parse().ok()?;
                format!("{}{digits}", if yy >= 50 { "19" } else { "20" })
            }
            (0x18, 14) => digits.to_owned(),
            _ => return None,
        };
        if !full.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let f = |r: std::ops::Range<usize>| &full[r];
        let rfc3339 = format!(
            "{}-{}-{}T{}:{}:{}Z",
            f(0..4),
            f(4..6),
            f(6..8),
            f(8..10),
            f(10..12),
            f(12..14)
        );
        Some((rfc3339.parse().ok()?, rest))
    }

    /// The `notAfter` of a DER certificate.
    pub(super) fn not_after(cert: &[u8]) -> Option<Timestamp> {
        let (cert, _) = item(cert, 0x30)?;
        let (tbs, _) = item(cert, 0x30)?;
        let mut rest = tbs;
        if rest.first() == Some(&0xa0) {
            rest = item(rest, 0xa0)?.1; // version
        }
        rest = item(rest, 0x02)?.1; // serialNumber
        rest = item(rest, 0x30)?.1; // signature
        rest = item(rest, 0x30)?.1; // issuer
        let (validity, _) = item(rest, 0x30)?;
        let (_not_before, rest) = time(validity)?;
        Some(time(rest)?.0)
    }
}

/// A TLS listener's acceptor, certificates and handshake timeout. Cheap to share (`Arc`
/// inside); every clone (one per per-core thread) sees the same certificates.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    resolver: Arc<Resolver>,
    files: Arc<[CertificateFiles]>,
    /// Serialises reloads, so that a slower one never swaps in older files over a newer one.
    reloading: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("alpn", &["h2", "http/1.1"])
            .field("handshake_timeout", &self.handshake_timeout)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

// === impl Tls ===

impl Tls {
    /// Loads the certificates of `files` (at least one; the first is the default) and builds
    /// the acceptor: `ring` provider, safe default protocol versions, no client
    /// authentication, ALPN `h2` then `http/1.1`. An expired certificate is refused.
    pub fn load(
        files: Vec<CertificateFiles>,
        handshake_timeout: Duration,
    ) -> Result<Tls, CertificateError> {
        let set = Certificates::load(&files, SystemTime::now())?;
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(set),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CertificateError {
                index: 0,
                source: TlsError::Config(e),
            })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout,
            resolver,
            files: files.into(),
            reloading: Arc::new(Mutex::new(())),
        })
    }

    /// The certificate files, in the configured order.
    pub fn files(&self) -> &[CertificateFiles] {
        &self.files
    }

    /// Re-reads every certificate file and, when all of them load (as at start), swaps them
    /// in for new handshakes; answers how many certificates are now served. On an error the
    /// current certificates stay. Blocking (file I/O).
    pub fn reload(&self) -> Result<usize, CertificateError> {
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let set = Certificates::load(&self.files, SystemTime::now())?;
        let n = set.len();
        self.resolver.current.store(Arc::new(set));
        Ok(n)
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

    /// A self-signed certificate for `names` (the first 2020-01-01 .. `not_after`).
    fn generate(names: &[&str], not_after: (i32, u8, u8)) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        /// Writes `NAME.pem` / `NAME-key.pem` for `names`, valid until 2100.
        fn add(&self, file: &str, names: &[&str]) -> CertificateFiles {
            self.add_until(file, names, (2100, 1, 1))
        }

        fn add_until(&self, file: &str, names: &[&str], until: (i32, u8, u8)) -> CertificateFiles {
            let (cert, key) = generate(names, until);
            std::fs::write(self.path(&format!("{file}.pem")), cert).unwrap();
            std::fs::write(self.path(&format!("{file}-key.pem")), key).unwrap();
            self.files(file)
        }

        fn files(&self, file: &str) -> CertificateFiles {
            CertificateFiles {
                cert: self.path(&format!("{file}.pem")),
                key: self.path(&format!("{file}-key.pem")),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    fn load(files: &[CertificateFiles]) -> Result<Certificates, CertificateError> {
        Certificates::load(files, SystemTime::now())
    }

    #[test]
    fn loads_a_pair_and_offers_h2_then_http1() {
        let f = Files::new();
        let tls = Tls::load(vec![f.add("a", &["localhost"])], Duration::from_secs(1)).unwrap();
        assert_eq!(
            tls.acceptor.config().alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn chooses_by_exact_name_then_wildcard_then_the_first() {
        let f = Files::new();
        let set = load(&[
            f.add("default", &["default.test"]),
            f.add("api", &["api.example.com", "API2.example.com"]),
            f.add("wild", &["*.example.com"]),
            f.add("deep", &["*.b.example.com"]),
        ])
        .unwrap();
        let cases = [
            (Some("api.example.com"), 1),
            (Some("API.Example.COM"), 1),
            (Some("api2.example.com"), 1),
            // An exact name wins over a wildcard that also covers it, whatever the order.
            (Some("www.example.com"), 2),
            (Some("x.b.example.com"), 3),
            // One label only: neither the apex nor two labels deep.
            (Some("example.com"), 0),
            (Some("a.x.example.com"), 0),
            (Some(".example.com"), 0),
            (Some("default.test"), 0),
            (Some("unknown.test"), 0),
            (None, 0),
        ];
        for (sni, want) in cases {
            assert_eq!(set.choose(sni), want, "{sni:?}");
        }
    }

    #[test]
    fn reads_not_after_in_both_time_forms() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 (RFC 5280).
        for (date, secs) in [
            ((2049, 12, 31), 2_524_521_600),
            ((2050, 1, 1), 2_524_608_000),
        ] {
            let (pem, _) = generate(&["a.test"], date);
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(der::not_after(&der).map(|t| t.unix_secs()), Some(secs));
        }
        assert_eq!(der::not_after(b"\x30\x03\x02\x01\x01"), None);
    }

    #[test]
    fn refuses_what_cannot_be_served() {
        let f = Files::new();
        let good = f.add("good", &["a.test"]);
        let err = |files: &[CertificateFiles]| load(files).unwrap_err();

        assert!(matches!(err(&[]).source, TlsError::Empty));

        let e = err(&[good.clone(), f.add_until("old", &["b.test"], (2021, 1, 1))]);
        assert_eq!(e.index, 1);
        assert_eq!(
            e.to_string(),
            format!(
                "certs[1]: `{}` expired at 2021-01-01T00:00:00Z",
                f.path("old.pem").display()
            )
        );

        let e = err(&[good.clone(), f.add("dup", &["c.test", "A.test"])]);
        assert_eq!(
            e.to_string(),
            format!(
                "certs[1]: `{}` names `a.test`, which is already a name of certs[0]",
                f.path("dup.pem").display()
            )
        );
        let e = err(&[f.add("w1", &["*.x.test"]), f.add("w2", &["*.x.test"])]);
        assert!(
            matches!(e.source, TlsError::DuplicateName { first: 0, .. }),
            "{e}"
        );

        // Only the default may go without a DNS name.
        let ip = f.add("ip", &["127.0.0.1"]);
        assert!(load(&[ip.clone(), good.clone()]).is_ok());
        let e = err(&[good.clone(), ip]);
        assert!(matches!(e.source, TlsError::NoName(_)), "{e}");

        // Another certificate's key.
        let mixed = CertificateFiles {
            cert: good.cert,
            key: f.files("dup").key,
        };
        let e = err(&[mixed]);
        assert!(matches!(e.source, TlsError::Config(_)), "{e}");
        assert!(e.to_string().contains("KeyMismatch"), "{e}");
        assert_eq!(e.source.path(), None);
    }

    #[test]
    fn reports_what_is_wrong_with_the_files() {
        let f = Files::new();
        let good = f.add("cert", &["localhost"]);
        let (cert, key) = (good.cert.clone(), good.key);
        let pair = |cert: &Path, key: &Path| {
            load(&[CertificateFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }])
            .map(|_| ())
            .map_err(|e| e.source)
        };
        let missing = f.path("missing.pem");
        let e = pair(&missing, &key).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().starts_with("cannot read `"), "{e}");

        std::fs::write(f.path("garbage.pem"), "not a certificate\n").unwrap();
        let e = pair(&f.path("garbage.pem"), &key).unwrap_err();
        assert_eq!(e.path(), Some(f.path("garbage.pem").as_path()));
        assert!(e.to_string().ends_with("holds no PEM certificate"), "{e}");

        // The certificate is not a key, and the key is not a certificate.
        let e = pair(&cert, &cert).unwrap_err();
        assert!(matches!(e, TlsError::NoKey(_)), "{e}");
        let e = pair(&key, &key).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate(_)), "{e}");

        std::fs::write(
            f.path("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = pair(&f.path("broken.pem"), &key).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e}");

        // Valid PEM around bytes that are no certificate.
        std::fs::write(
            f.path("notx509.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = pair(&f.path("notx509.pem"), &key).unwrap_err();
        assert!(matches!(e, TlsError::X509 { .. }), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_current_certificates() {
        let f = Files::new();
        let files = f.add("a", &["a.test"]);
        let tls = Tls::load(vec![files.clone()], Duration::from_secs(1)).unwrap();
        let before = tls.resolver.current.load_full();
        std::fs::write(&files.cert, "garbage").unwrap();
        let e = tls.reload().unwrap_err();
        assert!(matches!(e.source, TlsError::NoCertificate(_)), "{e}");
        assert!(Arc::ptr_eq(&before, &tls.resolver.current.load_full()));
        f.add("a", &["a.test", "b.test"]);
        assert_eq!(tls.reload().unwrap(), 1);
        assert_eq!(tls.resolver.current.load().exact.len(), 2);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let f = Files::new();
        let tls = Tls::load(vec![f.add("a", &["localhost"])], Duration::from_secs(10)).unwrap();
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
