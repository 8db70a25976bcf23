//! The operators' API: JSON, one request per line, over a Unix socket or TCP.
//!
//! ```text
//! -> {"id": 1, "method": "disk.create", "params": {"name": "vm1", "size": 10737418240}}
//! <- {"id": 1, "ok": true, "result": {"id": 3, "name": "vm1", "size": 10737418240}}
//! -> {"id": 2, "method": "disk.create", "params": {"name": "vm1", "size": 512}}
//! <- {"id": 2, "ok": false, "error": {"kind": "exists", "message": "disk \"vm1\" already exists"}}
//! ```
//!
//! Requests on one connection are answered in order. A line longer than 1 MiB, or one that is
//! not a JSON object with a string `method`, gets an error (`kind` "invalid"); an unknown
//! method gets `kind` "unknown_method". The methods and their parameters are listed in
//! `nbd-server/CONTROL.md`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use cas_store::{Store, StoreError};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

use crate::access::{AccessRules, Client};
use crate::admission::{Admission, AdmissionLimits, Negotiating};
use crate::node::Node;
use crate::tls::TlsConfig;

mod methods;
mod migrations;

use methods::{dispatch, Caller};
pub use migrations::serve_migrations;

const MAX_LINE: usize = 1 << 20;

/// Where the control API listens: a Unix socket (guarded by its file mode; its clients are
/// trusted) or TCP with mutual TLS (its clients are who their certificates say).
#[derive(Debug)]
pub enum ControlListener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, TlsConfig),
}

impl ControlListener {
    pub fn bind_unix(path: PathBuf) -> std::io::Result<ControlListener> {
        if path.exists() {
            // A socket left by a previous run (the bind would fail).
            std::fs::remove_file(&path)?;
        }
        Ok(ControlListener::Unix(UnixListener::bind(&path)?, path))
    }

    /// `tls` must verify client certificates: the TCP control API has no other guard.
    pub async fn bind_tcp(addr: &str, tls: TlsConfig) -> std::io::Result<ControlListener> {
        Ok(ControlListener::Tcp(TcpListener::bind(addr).await?, tls))
    }

    pub fn describe(&self) -> String {
        match self {
            ControlListener::Unix(_, p) => p.display().to_string(),
            ControlListener::Tcp(l, _) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        }
    }
}

/// A control error: what kind (for programs) and a message (for people).
#[derive(Debug)]
pub struct ControlError {
    pub kind: &'static str,
    pub message: String,
}

impl ControlError {
    fn invalid(message: impl Into<String>) -> ControlError {
        ControlError { kind: "invalid", message: message.into() }
    }

    fn not_found(what: impl std::fmt::Display) -> ControlError {
        ControlError { kind: "not_found", message: format!("no {what}") }
    }
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> ControlError {
        let kind = match e {
            StoreError::DiskNotFound(_) => "not_found",
            StoreError::DiskExists(_) => "exists",
            StoreError::OutOfRange { .. } | StoreError::InvalidArgument(_) => "invalid",
            StoreError::ReadOnly(_) => "read_only",
            _ => "failed",
        };
        ControlError { kind, message: e.to_string() }
    }
}

pub(super) type ControlResult = Result<Value, ControlError>;

/// Serves the control API on `listeners` until `shutdown` completes. TCP clients are admitted
/// as NBD clients are (see [`crate::admission`]): until its first request (the TLS handshake
/// included) a connection counts against a budget of its own, per source address too, with a
/// deadline that tightens as it fills (the Unix socket is guarded by its file mode). What a
/// TCP client may do follows `access` and the names in its certificate.
pub async fn serve_control(
    listeners: Vec<ControlListener>,
    node: Arc<Node>,
    limits: AdmissionLimits,
    access: Arc<AccessRules>,
    shutdown: impl Future<Output = ()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let node = node.clone();
        let admission = Admission::new("control", limits.clone());
        let access = access.clone();
        tasks.spawn(async move {
            loop {
                let accepted = match &listener {
                    ControlListener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                        let caller = Caller { client: Client::Local, access: access.clone() };
                        let node = node.clone();
                        tokio::spawn(async move { serve_connection(s, node, None, caller).await });
                    }),
                    ControlListener::Tcp(l, tls) => {
                        l.accept().await.map(|(s, peer)| match admission.begin(Some(peer.ip())) {
                            Ok(mut negotiating) => {
                                let (node, admission, access) = (node.clone(), admission.clone(), access.clone());
                                let acceptor = tls.acceptor();
                                tokio::spawn(async move {
                                    let started = std::time::Instant::now();
                                    let handshake = tokio::time::timeout(negotiating.timeout, acceptor.accept(s)).await;
                                    // One deadline for the handshake and the first request together.
                                    negotiating.timeout = negotiating.timeout.saturating_sub(started.elapsed());
                                    let stream = match handshake {
                                        Ok(Ok(stream)) => stream,
                                        Ok(Err(e)) => return tracing::debug!(%peer, "control client refused: TLS: {e}"),
                                        Err(_) => return tracing::debug!(%peer, "control client refused: TLS handshake too slow"),
                                    };
                                    let client = Client::from_chain(stream.get_ref().1.peer_certificates());
                                    tracing::debug!(%peer, client = %client.describe(), "control client");
                                    let caller = Caller { client, access };
                                    serve_connection(stream, node, Some((admission, negotiating)), caller).await
                                });
                            }
                            // Closed at once: nothing was allocated for it.
                            Err(refusal) => admission.log_refusal(Some(peer.ip()), refusal),
                        })
                    }
                };
                if let Err(e) = accepted {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        });
    }
    shutdown.await;
    tasks.abort_all();
}

/// `admitted`: a TCP client still negotiating: its first request must come within its
/// deadline; it then counts as established.
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    node: Arc<Node>,
    mut admitted: Option<(Arc<Admission>, Negotiating)>,
    caller: Caller,
) {
    let (reader, mut writer) = tokio::io::split(stream);
    // A small buffer: an idle or hostile client holds 1 KiB here, not the default 8 KiB.
    let mut reader = BufReader::with_capacity(1024, reader);
    let mut line = Vec::new();
    let mut _established = None;
    loop {
        line.clear();
        // Bounded: a client cannot make the server buffer more than MAX_LINE bytes.
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let n = match admitted.as_ref().map(|(_, n)| n.timeout) {
            Some(deadline) => match tokio::time::timeout(deadline, read).await {
                Ok(r) => r,
                Err(_) => return,
            },
            None => read.await,
        };
        let n = match n {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if let Some((admission, negotiating)) = admitted.take() {
            match admission.establish(negotiating) {
                Ok(place) => _established = Some(place),
                Err(refusal) => return admission.log_refusal(None, refusal),
            }
        }
        let too_long = line.len() > MAX_LINE;
        let reply = if too_long {
            error_reply(Value::Null, ControlError::invalid(format!("request longer than {MAX_LINE} bytes")))
        } else {
            handle_line(&line, &node, &caller).await
        };
        let mut out = serde_json::to_vec(&reply).expect("json");
        out.push(b'\n');
        if writer.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}

fn error_reply(id: Value, e: ControlError) -> Value {
    json!({"id": id, "ok": false, "error": {"kind": e.kind, "message": e.message}})
}

async fn handle_line(line: &[u8], node: &Arc<Node>, caller: &Caller) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_reply(Value::Null, ControlError::invalid(format!("not JSON: {e}"))),
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return error_reply(id, ControlError::invalid("a request needs a string \"method\""));
    };
    let params = request.get("params").cloned().unwrap_or(json!({}));
    match dispatch(node, caller, method, params).await {
        Ok(result) => json!({"id": id, "ok": true, "result": result}),
        Err(e) => error_reply(id, e),
    }
}

pub(super) fn params<T: for<'de> Deserialize<'de>>(p: Value) -> Result<T, ControlError> {
    serde_json::from_value(p).map_err(|e| ControlError::invalid(format!("parameters: {e}")))
}

/// Runs store work on the blocking pool.
pub(super) async fn on_store<T: Send + 'static>(
    node: &Arc<Node>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ControlError> {
    let store = node.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| ControlError { kind: "failed", message: e.to_string() })?
        .map_err(ControlError::from)
}
