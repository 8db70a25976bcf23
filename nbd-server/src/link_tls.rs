//! Mutual TLS for the migration link between two servers.
//!
//! Both servers of a migration hold a certificate signed by the datacentres' CA (one
//! certificate per server, with both the serverAuth and clientAuth uses): the destination
//! accepts only sources whose certificate chains to that CA, and the source checks the
//! destination's certificate against the CA and the address it dialled. A peer without a valid
//! certificate is refused during the handshake, before any disk data moves.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::tls::{read_certs, read_key, TlsError};

/// TLS settings for both ends of a migration link.
#[derive(Clone)]
pub struct LinkTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls").finish_non_exhaustive()
    }
}

impl LinkTls {
    /// This server's certificate and key, and the CA that signs every server's certificate.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<LinkTls, TlsError> {
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
        Ok(LinkTls { acceptor: TlsAcceptor::from(Arc::new(server)), connector: TlsConnector::from(Arc::new(client)) })
    }

    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }

    /// Connects to `address` (host:port), checking the peer's certificate against `host`.
    pub async fn connect(
        &self,
        address: &str,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        self.connector.connect(name, stream).await
    }
}
