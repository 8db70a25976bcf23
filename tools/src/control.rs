//! A client of a server's control API (JSON lines over a Unix socket or TCP).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// One connection to a server's control API.
pub struct ControlClient {
    address: String,
    reader: BufReader<Box<dyn std::io::Read + Send>>,
    writer: Box<dyn Write + Send>,
    next_id: u64,
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
        let (reader, writer): (Box<dyn std::io::Read + Send>, Box<dyn Write + Send>) = if is_path {
            let s = UnixStream::connect(address).with_context(|| format!("no server at control socket {address}"))?;
            (Box::new(s.try_clone()?), Box::new(s))
        } else {
            let s = TcpStream::connect(address).with_context(|| format!("no server at control address {address}"))?;
            s.set_read_timeout(Some(Duration::from_secs(600)))?;
            (Box::new(s.try_clone()?), Box::new(s))
        };
        Ok(ControlClient { address: address.to_string(), reader: BufReader::new(reader), writer, next_id: 1 })
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
        self.writer.write_all(&line).with_context(|| format!("sending to {}", self.address))?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply).with_context(|| format!("reading from {}", self.address))?;
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
