//! A client of a server's control API (JSON lines over a Unix socket, or TCP with mutual TLS).
//!
//! Over TCP the client presents the certificate named by the environment:
//! `NBD_CAS_CONTROL_CERT` (chain, PEM), `NBD_CAS_CONTROL_KEY` (its key) and
//! `NBD_CAS_CONTROL_CA` (the CA that signed the server's certificate), as `etcdctl` and the
//! like do: the same settings serve every command of `cas` and `migrate`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// A byte stream both ways: a Unix socket, or TLS over TCP.
trait Duplex: std::io::Read + Write + Send {}
impl<T: std::io::Read + Write + Send> Duplex for T {}

/// One connection to a server's control API.
pub struct ControlClient {
    address: String,
    stream: BufReader<Box<dyn Duplex>>,
    next_id: u64,
}

/// The environment variables of the client certificate.
pub const CERT_VAR: &str = "NBD_CAS_CONTROL_CERT";
pub const KEY_VAR: &str = "NBD_CAS_CONTROL_KEY";
pub const CA_VAR: &str = "NBD_CAS_CONTROL_CA";

/// The client's TLS settings from the environment.
fn tls_config(address: &str) -> Result<Arc<rustls::ClientConfig>> {
    let var = |name: &str| {
        std::env::var_os(name).map(std::path::PathBuf::from).ok_or_else(|| {
            anyhow!(
                "{address}: the TCP control API needs mutual TLS: set {CERT_VAR}, {KEY_VAR} and {CA_VAR} to this client's certificate, its key and the server's CA (or use the server's Unix control socket)"
            )
        })
    };
    let (cert, key, ca) = (var(CERT_VAR)?, var(KEY_VAR)?, var(CA_VAR)?);
    let open = |p: &std::path::Path| std::fs::File::open(p).map(std::io::BufReader::new).with_context(|| format!("reading {}", p.display()));
    let chain = rustls_pemfile::certs(&mut open(&cert)?).collect::<Result<Vec<_>, _>>().with_context(|| format!("{}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut open(&key)?)?.ok_or_else(|| anyhow!("{}: no private key", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut open(&ca)?) {
        roots.add(c.with_context(|| format!("{}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient").field("address", &self.address).finish()
    }
}

/// An error the server returned (as opposed to a failure to reach it).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServerError {
    pub kind: String,
    pub message: String,
}

impl ControlClient {
    /// `address` is a Unix socket path (an existing file, or anything with a `/`) or
    /// `host:port`.
    pub fn connect(address: &str) -> Result<ControlClient> {
        let is_path = address.contains('/') || std::path::Path::new(address).exists() || !address.contains(':');
        let stream: Box<dyn Duplex> = if is_path {
            Box::new(UnixStream::connect(address).with_context(|| format!("no server at control socket {address}"))?)
        } else {
            let config = tls_config(address)?;
            let host = address.rsplit_once(':').map_or(address, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).with_context(|| format!("{address}: server name"))?;
            let tcp = TcpStream::connect(address).with_context(|| format!("no server at control address {address}"))?;
            tcp.set_read_timeout(Some(Duration::from_secs(600)))?;
            let tls = rustls::ClientConnection::new(config, name)?;
            Box::new(rustls::StreamOwned::new(tls, tcp))
        };
        Ok(ControlClient { address: address.to_string(), stream: BufReader::new(stream), next_id: 1 })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Calls a method; a server-side error comes back as a [`ServerError`].
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&json!({"id": id, "method": method, "params": params}))?;
        line.push(b'\n');
        let writer = self.stream.get_mut();
        writer.write_all(&line).and_then(|()| writer.flush()).with_context(|| format!("sending to {}", self.address))?;
        let mut reply = String::new();
        self.stream.read_line(&mut reply).with_context(|| format!("reading from {}", self.address))?;
        if reply.is_empty() {
            bail!("{} closed the connection", self.address);
        }
        let v: Value = serde_json::from_str(&reply).context("reply is not JSON")?;
        if v["ok"].as_bool() == Some(true) {
            Ok(v["result"].clone())
        } else {
            let e = &v["error"];
            Err(anyhow!(ServerError {
                kind: e["kind"].as_str().unwrap_or("failed").to_string(),
                message: e["message"].as_str().unwrap_or("unknown error").to_string(),
            }))
        }
    }
}
