//! TLS settings from PEM files (rustls with the ring provider).

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
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
///
/// Clones share one configuration: [`TlsConfig::reload`] (the server runs it on SIGHUP)
/// reads the files again and the next handshake uses them; sessions already established keep
/// theirs, so no connection drops.
#[derive(Clone)]
pub struct TlsConfig {
    server_config: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    /// The files it came from (None: built from a ready rustls configuration).
    files: Option<Arc<PemFiles>>,
    /// FORCEDTLS mode: every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`.
    pub required: bool,
}

#[derive(Debug)]
struct PemFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("required", &self.required).finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Wraps a ready rustls configuration.
    pub fn new(server_config: Arc<rustls::ServerConfig>, required: bool) -> TlsConfig {
        TlsConfig { server_config: Arc::new(RwLock::new(server_config)), files: None, required }
    }

    /// Loads a certificate chain and key (PEM). With `client_ca`, clients must present a
    /// certificate signed by one of its CAs (mutual TLS).
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        required: bool,
    ) -> Result<TlsConfig, TlsError> {
        let files = PemFiles { cert: cert.to_owned(), key: key.to_owned(), client_ca: client_ca.map(Path::to_owned) };
        let config = files.load()?;
        Ok(TlsConfig { server_config: Arc::new(RwLock::new(config)), files: Some(Arc::new(files)), required })
    }

    /// Reads the certificate, key and client CA files again; on success the next handshake
    /// uses them. On failure nothing changes (the error says why).
    pub fn reload(&self) -> Result<(), TlsError> {
        if let Some(files) = &self.files {
            let config = files.load()?;
            *self.server_config.write() = config;
        }
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server_config.read()))
    }
}

impl PemFiles {
    fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (cert, key, client_ca) = (&self.cert, &self.key, self.client_ca.as_deref());
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
        Ok(Arc::new(builder.with_single_cert(chain, key)?))
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
