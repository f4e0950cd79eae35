//! TLS to upstreams: the rustls client config of a pool's `tls:` block (its roots, the
//! optional client certificate, ALPN for the pool's protocol) and the server name a target
//! is checked against.
//!
//! rustls runs with its `ring` provider only, as the listeners do. Without `ca` the host's
//! trust store is used (`rustls-native-certs`: on Debian the bundle `ca-certificates`
//! maintains, so an operator's own CA added there is trusted and a CA removed there is not);
//! with `ca`, only the certificates of that file. The config is built when the gateway
//! config is decoded, so an unreadable file, a file without PEM, a certificate without its
//! key or a server name that is not one is reported at its place in the file (and by
//! `fairgate check`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use crate::tls::{read_certs, read_key, TlsError};

/// How a pool's connections to its targets speak HTTP (`protocol:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, with or without TLS (the default).
    #[default]
    Http1,
    /// HTTP/2 over plain TCP with prior knowledge (no upgrade, no ALPN).
    H2c,
    /// HTTP/2 over TLS, agreed by ALPN (`h2` is the only protocol offered: an upstream that
    /// does not agree fails the handshake).
    H2,
}

impl UpstreamProtocol {
    /// Whether requests go out as HTTP/2.
    pub fn is_h2(self) -> bool {
        matches!(self, UpstreamProtocol::H2 | UpstreamProtocol::H2c)
    }

    /// The ALPN protocols a TLS connection offers for this protocol.
    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            UpstreamProtocol::H2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Http1 | UpstreamProtocol::H2c => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Why a pool's `tls:` block cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamTlsError {
    /// A file of the block is unusable (read, PEM, no certificate, no key).
    #[error(transparent)]
    File(#[from] TlsError),
    /// `ca` is absent and the host's trust store holds no usable certificate.
    #[error("no root certificate found in the system trust store ({0}); set `ca`")]
    NoSystemRoots(String),
    /// A certificate of `ca` cannot be a trust anchor.
    #[error("`{path}` holds a certificate that cannot be a root: {source}")]
    BadRoot {
        /// The `ca` file.
        path: std::path::PathBuf,
        /// Why.
        source: rustls::Error,
    },
}

/// Builds a pool's rustls client config: `ring` provider, safe default protocol versions,
/// the roots of `ca` (or the system's), the client certificate when `cert`/`key` are given,
/// ALPN for `protocol`.
pub(crate) fn client_config(
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    protocol: UpstreamProtocol,
) -> Result<Arc<ClientConfig>, UpstreamTlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|source| UpstreamTlsError::BadRoot {
                        path: path.to_owned(),
                        source,
                    })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "it is empty".to_owned(), ToString::to_string);
                return Err(UpstreamTlsError::NoSystemRoots(why));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((cert, key)) => {
            let certs = read_certs(cert)?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(TlsError::Config)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = protocol.alpn();
    Ok(Arc::new(config))
}

/// Parses a configured `server_name` (a DNS name or an IP address).
pub(crate) fn parse_server_name(name: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_checked() {
        assert!(parse_server_name("api.internal").is_some());
        assert!(parse_server_name("10.0.0.1").is_some());
        assert!(parse_server_name("not a name").is_none());
        assert!(parse_server_name("").is_none());
    }

    #[test]
    fn alpn_follows_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ck.cert.pem()).unwrap();
        let h2 = client_config(Some(&ca), None, UpstreamProtocol::H2).unwrap();
        assert_eq!(h2.alpn_protocols, [b"h2".to_vec()]);
        let h1 = client_config(Some(&ca), None, UpstreamProtocol::Http1).unwrap();
        assert_eq!(h1.alpn_protocols, [b"http/1.1".to_vec()]);
        // A key is not a CA.
        let key = dir.path().join("key.pem");
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let e = client_config(Some(&key), None, UpstreamProtocol::Http1).unwrap_err();
        assert!(e.to_string().ends_with("holds no PEM certificate"), "{e}");
        // A client certificate with another certificate's key.
        let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        let other_key = dir.path().join("other.pem");
        std::fs::write(&other_key, other.key_pair.serialize_pem()).unwrap();
        let e =
            client_config(Some(&ca), Some((&ca, &other_key)), UpstreamProtocol::Http1).unwrap_err();
        assert!(e.to_string().contains("cannot be used together"), "{e}");
    }
}
