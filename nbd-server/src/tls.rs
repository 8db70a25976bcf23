//! TLS settings from PEM files (rustls with the ring provider).

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio_rustls::TlsAcceptor;

/// Problems loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    #[error("{0}: no private key found")]
    NoKey(PathBuf),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server's TLS setup: certificate, key, optional client CA, and whether plain clients
/// are refused.
#[derive(Clone)]
pub struct TlsConfig {
    server_config: Arc<rustls::ServerConfig>,
    /// FORCEDTLS mode: every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`.
    pub required: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("required", &self.required).finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Wraps a ready rustls configuration.
    pub fn new(server_config: Arc<rustls::ServerConfig>, required: bool) -> TlsConfig {
        TlsConfig { server_config, required }
    }

    /// Loads a certificate chain and key (PEM). With `client_ca`, clients must present a
    /// certificate signed by one of its CAs (mutual TLS).
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        required: bool,
    ) -> Result<TlsConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(cert)?;
        let key = read_key(key)?;
        let builder =
            rustls::ServerConfig::builder_with_provider(Arc::clone(&provider)).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca_path) => {
                let mut roots = RootCertStore::empty();
                for ca in read_certs(ca_path)? {
                    roots.add(ca)?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key)?;
        Ok(TlsConfig::new(Arc::new(config), required))
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server_config))
    }
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, TlsError> {
    std::fs::File::open(path).map(BufReader::new).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|source| TlsError::Read { path: path.to_owned(), source })?
        .ok_or_else(|| TlsError::NoKey(path.to_owned()))
}
