//! Mutual TLS for the migration link between two servers.
//!
//! Both servers of a migration hold a certificate signed by the datacentres' CA (one
//! certificate per server, with both the serverAuth and clientAuth uses): the destination
//! accepts only sources whose certificate chains to that CA, and the source checks the
//! destination's certificate against the CA and the address it dialled. A peer without a valid
//! certificate is refused during the handshake, before any disk data moves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::tls::{read_certs, read_key, TlsError};

/// TLS settings for both ends of a migration link.
///
/// Clones share one configuration, which [`LinkTls::reload`] (SIGHUP) replaces for the next
/// handshake; links already up keep their sessions.
#[derive(Clone)]
pub struct LinkTls {
    current: Arc<RwLock<(TlsAcceptor, TlsConnector)>>,
    files: Arc<(PathBuf, PathBuf, PathBuf)>,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls").finish_non_exhaustive()
    }
}

impl LinkTls {
    /// This server's certificate and key, and the CA that signs every server's certificate.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<LinkTls, TlsError> {
        let current = Self::load(cert, key, ca)?;
        Ok(LinkTls { current: Arc::new(RwLock::new(current)), files: Arc::new((cert.into(), key.into(), ca.into())) })
    }

    /// Reads the certificate, key and CA files again; on failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (cert, key, ca) = &*self.files;
        *self.current.write() = Self::load(cert, key, ca)?;
        Ok(())
    }

    fn load(cert: &Path, key: &Path, ca: &Path) -> Result<(TlsAcceptor, TlsConnector), TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(cert)?;
        let key = read_key(key)?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca)? {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok((TlsAcceptor::from(Arc::new(server)), TlsConnector::from(Arc::new(client))))
    }

    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = self.current.read().0.clone();
        acceptor.accept(stream).await
    }

    /// Connects to `address` (host:port), checking the peer's certificate against `host`.
    pub async fn connect<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        &self,
        address: &str,
        stream: S,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let connector = self.current.read().1.clone();
        connector.connect(name, stream).await
    }
}
