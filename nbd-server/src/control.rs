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
use migration::{Connector, LinkStream, MigrationReport, MigrationStatus, SourceConfig, Stage, SwitchAfter};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener};

use crate::admission::{Admission, AdmissionLimits, Negotiating};
use crate::compaction::DEFAULT_COMPACT_BELOW;
use crate::node::{Node, NodeSourceHooks};

const MAX_LINE: usize = 1 << 20;

/// Where the control API listens.
#[derive(Debug)]
pub enum ControlListener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl ControlListener {
    pub fn bind_unix(path: PathBuf) -> std::io::Result<ControlListener> {
        if path.exists() {
            // A socket left by a previous run (the bind would fail).
            std::fs::remove_file(&path)?;
        }
        Ok(ControlListener::Unix(UnixListener::bind(&path)?, path))
    }

    pub async fn bind_tcp(addr: &str) -> std::io::Result<ControlListener> {
        Ok(ControlListener::Tcp(TcpListener::bind(addr).await?))
    }

    pub fn describe(&self) -> String {
        match self {
            ControlListener::Unix(_, p) => p.display().to_string(),
            ControlListener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
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

type ControlResult = Result<Value, ControlError>;

/// Serves the control API on `listeners` until `shutdown` completes. TCP clients are admitted
/// as NBD clients are (see [`crate::admission`]): until its first request a connection counts
/// against a budget of its own, per source address too, with a deadline that tightens as it
/// fills (the Unix socket is guarded by its file mode).
pub async fn serve_control(
    listeners: Vec<ControlListener>,
    node: Arc<Node>,
    limits: AdmissionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let node = node.clone();
        let admission = Admission::new("control", limits.clone());
        tasks.spawn(async move {
            loop {
                let accepted = match &listener {
                    ControlListener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                        let node = node.clone();
                        tokio::spawn(async move { serve_connection(s, node, None).await });
                    }),
                    ControlListener::Tcp(l) => {
                        l.accept().await.map(|(s, peer)| match admission.begin(Some(peer.ip())) {
                            Ok(negotiating) => {
                                let (node, admission) = (node.clone(), admission.clone());
                                tokio::spawn(
                                    async move { serve_connection(s, node, Some((admission, negotiating))).await },
                                );
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
            handle_line(&line, &node).await
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

async fn handle_line(line: &[u8], node: &Arc<Node>) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_reply(Value::Null, ControlError::invalid(format!("not JSON: {e}"))),
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return error_reply(id, ControlError::invalid("a request needs a string \"method\""));
    };
    let params = request.get("params").cloned().unwrap_or(json!({}));
    match dispatch(node, method, params).await {
        Ok(result) => json!({"id": id, "ok": true, "result": result}),
        Err(e) => error_reply(id, e),
    }
}

fn params<T: for<'de> Deserialize<'de>>(p: Value) -> Result<T, ControlError> {
    serde_json::from_value(p).map_err(|e| ControlError::invalid(format!("parameters: {e}")))
}

/// Runs store work on the blocking pool.
async fn on_store<T: Send + 'static>(
    node: &Arc<Node>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ControlError> {
    let store = node.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| ControlError { kind: "failed", message: e.to_string() })?
        .map_err(ControlError::from)
}

/// `migration.set_bandwidth`: the cap in bits per second (null or 0: none).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBandwidth {
    id: String,
    bandwidth_bps: Option<u64>,
}

/// `disk.snapshot` and `disk.clone`: copy disk `source` as `name`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Copy {
    source: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameSize {
    name: String,
    size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptName {
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Gc {
    #[serde(default)]
    below: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Fsck {
    #[serde(default)]
    verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartMigration {
    disk: String,
    /// The destination server's migration address (host:port).
    destination: String,
    switch_after: Option<SwitchAfter>,
    zstd_level: Option<i32>,
    max_rounds: Option<u32>,
    converge_blocks: Option<u64>,
    #[serde(default)]
    delete_source: bool,
    bandwidth_bps: Option<u64>,
    /// Seconds the source keeps reconnecting after a lost link before the migration is
    /// interrupted (default 600).
    reconnect_window_secs: Option<u64>,
    /// Compress block data as one zstd stream per connection (default true).
    data_stream: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    disk: String,
    destination: String,
    link_rate_bps: Option<u64>,
    zstd_level: Option<i32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Id {
    id: String,
}

async fn dispatch(node: &Arc<Node>, method: &str, p: Value) -> ControlResult {
    match method {
        "server.info" => {
            let store = &node.store;
            Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "block_size": store.block_size(),
                "algorithm": store.algorithm(),
                "addresses": *node.addresses.read(),
                "exports": node.exports.list().iter().map(|e| e.name().to_string()).collect::<Vec<_>>(),
            }))
        }
        "disk.list" => {
            let disks = on_store(node, |s| s.list_disks()).await?;
            Ok(json!(disks
                .into_iter()
                .filter(|d| Node::is_exportable(&d.name))
                .map(|d| json!({"name": d.name, "size": d.size, "read_only": d.read_only, "origin": d.origin, "exported": node.exports.get(&d.name).is_some()}))
                .collect::<Vec<_>>()))
        }
        "disk.create" => {
            let NameSize { name, size } = params(p)?;
            if !Node::is_exportable(&name) {
                return Err(ControlError::invalid("names ending in .incoming are reserved for migrations"));
            }
            let info = on_store(node, move |s| s.create_disk(&name, size)).await?;
            node.export_disk(&info.name)?;
            Ok(json!(info))
        }
        "disk.snapshot" | "disk.clone" => {
            let Copy { source, name } = params(p)?;
            if !Node::is_exportable(&name) || !Node::is_exportable(&source) {
                return Err(ControlError::invalid("names ending in .incoming are reserved for migrations"));
            }
            let read_only = method == "disk.snapshot";
            let info =
                on_store(
                    node,
                    move |s| if read_only { s.snapshot_disk(&source, &name) } else { s.clone_disk(&source, &name) },
                )
                .await?;
            node.export_disk(&info.name)?;
            Ok(json!(info))
        }
        "disk.delete" => {
            let Name { name } = params(p)?;
            if node.migrations().iter().any(|m| m.disk == name && !m.is_finished()) {
                return Err(ControlError { kind: "busy", message: format!("disk {name:?} is migrating") });
            }
            node.store.disk(&name)?;
            node.unexport(&name);
            on_store(node, move |s| s.delete_disk(&name)).await?;
            Ok(json!({}))
        }
        "disk.resize" => {
            let NameSize { name, size } = params(p)?;
            let info = on_store(node, move |s| s.resize_disk(&name, size)).await?;
            Ok(json!(info))
        }
        "disk.stats" | "store.stats" => {
            let OptName { name } = params(p)?;
            on_store(node, move |s| {
                let names: Vec<String> = match name {
                    Some(n) => vec![n],
                    None => s.list_disks()?.into_iter().map(|d| d.name).filter(|n| Node::is_exportable(n)).collect(),
                };
                let disks = names.iter().map(|n| s.disk_stats(n)).collect::<Result<Vec<_>, _>>()?;
                Ok(json!({"store": s.stats()?, "disks": disks}))
            })
            .await
        }
        "store.gc" => {
            let Gc { below } = params(p)?;
            let below = below.unwrap_or(DEFAULT_COMPACT_BELOW);
            if !(0.0..=1.0).contains(&below) {
                return Err(ControlError::invalid(format!("below {below} is not a share from 0 to 1")));
            }
            let report = on_store(node, move |s| s.compact(below)).await?;
            Ok(json!(report))
        }
        "store.fsck" => {
            let Fsck { verify } = params(p)?;
            let report = on_store(node, move |s| s.fsck(verify)).await?;
            Ok(json!(report))
        }
        "export.stats" => {
            let OptName { name } = params(p)?;
            let exports = match name {
                Some(n) => vec![node
                    .exports
                    .get(&n)
                    .ok_or_else(|| ControlError { kind: "not_found", message: format!("no export {n:?}") })?],
                None => node.exports.list(),
            };
            Ok(json!(exports
                .iter()
                .map(|e| json!({"name": e.name(), "stats": e.stats().snapshot()}))
                .collect::<Vec<_>>()))
        }
        "migration.start" => {
            let req: StartMigration = params(p)?;
            let id = start_migration(node, req).await?;
            Ok(json!({"id": id}))
        }
        "migration.status" => {
            let Id { id } = params(p)?;
            node.migration(&id)
                .map(|r| json!(r))
                .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })
        }
        "migration.list" => Ok(json!(node.migrations())),
        "migration.cancel" => {
            let Id { id } = params(p)?;
            cancel_migration(node, &id).await?;
            Ok(json!({}))
        }
        "migration.switch" => {
            let Id { id } = params(p)?;
            let report = switch_migration(node, &id).await?;
            Ok(json!(report))
        }
        "migration.set_bandwidth" => {
            let SetBandwidth { id, bandwidth_bps } = params(p)?;
            let status = node
                .migration_status(&id)
                .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })?;
            status.set_bandwidth(bandwidth_bps.filter(|&r| r > 0)).map_err(refused)?;
            Ok(json!(status.report()))
        }
        "migration.resume" => {
            let Id { id } = params(p)?;
            resume_migration(node, &id)?;
            Ok(json!({}))
        }
        "migration.plan" => {
            let req: Plan = params(p)?;
            node.store.disk(&req.disk)?;
            let stream = connect(node, &req.destination).await?;
            let report = migration::run_plan(
                node.store.clone(),
                &req.disk,
                &req.destination,
                stream,
                req.link_rate_bps,
                req.zstd_level.unwrap_or(3),
            )
            .await
            .map_err(|e| ControlError { kind: "failed", message: e.to_string() })?;
            Ok(json!(report))
        }
        other => Err(ControlError { kind: "unknown_method", message: format!("unknown method {other:?}") }),
    }
}

async fn connect(node: &Node, destination: &str) -> Result<LinkStream, ControlError> {
    connect_link(node.link_tls.clone(), destination)
        .await
        .map_err(|e| ControlError { kind: "unreachable", message: e.to_string() })
}

/// A migration link: TLS over TCP, or plain TCP with `--migration-insecure`.
async fn connect_link(tls: Option<crate::link_tls::LinkTls>, destination: &str) -> std::io::Result<LinkStream> {
    let stream = TcpStream::connect(destination)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {destination}: {e}")))?;
    let _ = stream.set_nodelay(true);
    match tls {
        Some(tls) => {
            let stream = tls.connect(destination, stream).await.map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, format!("TLS with {destination}: {e}"))
            })?;
            Ok(Box::new(stream))
        }
        None => Ok(Box::new(stream)),
    }
}

/// Connects to one destination, again after each lost link.
fn connector(node: &Node, destination: &str) -> Arc<dyn Connector> {
    let (tls, destination) = (node.link_tls.clone(), destination.to_string());
    Arc::new(move || {
        let (tls, destination) = (tls.clone(), destination.clone());
        async move { connect_link(tls, &destination).await }
    })
}

async fn start_migration(node: &Arc<Node>, req: StartMigration) -> Result<String, ControlError> {
    node.store.disk(&req.disk)?;
    if node.migrations().iter().any(|m| m.disk == req.disk && m.role == "source" && !m.is_finished()) {
        return Err(ControlError { kind: "busy", message: format!("disk {:?} is already migrating", req.disk) });
    }
    // Fail fast when the destination cannot be reached at all (a later lost link is retried).
    let first = connect(node, &req.destination).await?;
    let id = node.new_migration_id("mig");
    let defaults = SourceConfig::default();
    let config = SourceConfig {
        migration_id: id.clone(),
        switch_after: req.switch_after.unwrap_or_default(),
        max_rounds: req.max_rounds.unwrap_or(defaults.max_rounds),
        converge_blocks: req.converge_blocks.unwrap_or(defaults.converge_blocks),
        zstd_level: req.zstd_level,
        batch_bytes: defaults.batch_bytes,
        delete_source: req.delete_source,
        bandwidth_bps: req.bandwidth_bps,
        reconnect_window_secs: req.reconnect_window_secs.unwrap_or(defaults.reconnect_window_secs),
        data_stream: req.data_stream.unwrap_or(defaults.data_stream),
        restarted_at: None,
    };
    let status = MigrationStatus::new(MigrationReport::new(&id, &req.disk, "source", &req.destination));
    node.register_migration(&id, status.clone());
    let first = parking_lot::Mutex::new(Some(first));
    let reconnect = connector(node, &req.destination);
    let connect_first: Arc<dyn Connector> = Arc::new(FirstThen { first, then: reconnect });
    spawn_source(node, &req.disk, connect_first, config, status);
    Ok(id)
}

/// Uses an already open stream for the first connection, then reconnects.
struct FirstThen {
    first: parking_lot::Mutex<Option<LinkStream>>,
    then: Arc<dyn Connector>,
}

impl Connector for FirstThen {
    fn connect(&self) -> migration::link::ConnectFuture<'_> {
        match self.first.lock().take() {
            Some(s) => Box::pin(async move { Ok(s) }),
            None => self.then.connect(),
        }
    }
}

fn spawn_source(
    node: &Arc<Node>,
    disk: &str,
    connector: Arc<dyn Connector>,
    config: SourceConfig,
    status: Arc<MigrationStatus>,
) {
    let (node2, disk) = (node.clone(), disk.to_string());
    tokio::spawn(async move {
        let hooks = Arc::new(NodeSourceHooks(node2.clone()));
        let _ = migration::run_source_with(
            node2.store.clone(),
            &disk,
            connector,
            config,
            hooks,
            status,
            Some(node2.state.clone()),
        )
        .await;
    });
}

/// Continues an outgoing migration: reconnect now if its link is down, or restart it if a
/// restart of this server interrupted it.
fn resume_migration(node: &Arc<Node>, id: &str) -> Result<(), ControlError> {
    let status = node
        .migration_status(id)
        .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })?;
    if let Some(record) = node.take_dormant(id) {
        restart_source(node, record, status, false);
        return Ok(());
    }
    status.request_resume().map_err(refused)
}

/// Runs an outgoing migration again from its record after a restart of this server.
fn restart_source(node: &Arc<Node>, record: migration::MigrationRecord, status: Arc<MigrationStatus>, cancel: bool) {
    let config = SourceConfig { restarted_at: Some(record.stage), ..record.config.clone().unwrap_or_default() };
    status.update(|r| r.cancellable = record.stage == Stage::PreCopy);
    if cancel {
        let _ = status.request_cancel();
    }
    tracing::info!(id = %record.id, disk = %record.disk, stage = ?record.stage, "resuming an outgoing migration after a restart");
    let connector = connector(node, &record.peer);
    spawn_source(node, &record.disk, connector, config, status);
}

async fn cancel_migration(node: &Arc<Node>, id: &str) -> Result<(), ControlError> {
    let status = node
        .migration_status(id)
        .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })?;
    let role = status.report().role;
    if role == "destination" {
        return node.destination.cancel(id).await.map_err(|message| ControlError { kind: "invalid", message });
    }
    if let Some(record) = node.take_dormant(id) {
        if record.stage != Stage::PreCopy {
            let message = format!("migration {id} is past its switch-over; resume it instead");
            node.restore_dormant(record);
            return Err(ControlError { kind: "invalid", message });
        }
        // The source reconnects to tell the destination, which drops its partial disk.
        restart_source(node, record, status, true);
        return Ok(());
    }
    status.request_cancel().map_err(refused)
}

fn refused(e: migration::RequestError) -> ControlError {
    ControlError { kind: "invalid", message: e.to_string() }
}

/// How long `migration.switch` waits for the destination to serve the disk.
const SWITCH_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The switch-over on command (the hypervisor's hook when it pauses the VM): freezes the
/// source export, sends the final listing and SWITCH, and returns once the destination
/// serves the disk, with the downtime in the report.
async fn switch_migration(node: &Arc<Node>, id: &str) -> Result<MigrationReport, ControlError> {
    let status = node
        .migration_status(id)
        .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })?;
    status.request_switch().map_err(refused)?;
    match tokio::time::timeout(SWITCH_WAIT, status.wait_switched()).await {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => Err(ControlError { kind: "failed", message: e.to_string() }),
        Err(_) => Err(ControlError {
            kind: "failed",
            message: format!("migration {id} has not switched over after {SWITCH_WAIT:?}; see `migrate status`"),
        }),
    }
}

/// Accepts migrations sent to this server until `shutdown` completes.
/// Migration connections are admitted as NBD clients are (see [`crate::admission`]): the TLS
/// handshake counts against a negotiating budget, per source address too, under a deadline
/// that tightens as the budget fills, and nothing of a migration is allocated before it
/// succeeds (the destination then bounds the protocol's own greeting and HELLO).
pub async fn serve_migrations(
    listener: TcpListener,
    node: Arc<Node>,
    limits: AdmissionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let admission = Admission::new("migration", limits);
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "migration accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let negotiating = match admission.begin(Some(peer.ip())) {
                Ok(n) => n,
                Err(refusal) => {
                    admission.log_refusal(Some(peer.ip()), refusal);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // The TLS handshake runs in the connection's task, so a slow peer cannot hold up
            // the listener.
            let tls = node.link_tls.clone();
            let (node, admission) = (node.clone(), admission.clone());
            tokio::spawn(async move {
                let deadline = negotiating.timeout;
                let stream: LinkStream = match tls {
                    Some(tls) => match tokio::time::timeout(deadline, tls.accept(stream)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "migration peer refused: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "migration peer refused: TLS handshake not finished within {deadline:?}");
                            return;
                        }
                    },
                    None => Box::new(stream),
                };
                let _established = match admission.establish(negotiating) {
                    Ok(place) => place,
                    Err(refusal) => return admission.log_refusal(Some(peer.ip()), refusal),
                };
                // Tracks the connection until its HELLO names the migration (the destination
                // then registers the migration under the source's id).
                let status = MigrationStatus::new(MigrationReport::new("?", "?", "destination", &peer.to_string()));
                match node.destination.serve(stream, status).await {
                    Ok(_) => {}
                    Err(migration::MigrationError::Superseded) => {}
                    Err(e) => tracing::warn!(%peer, error = %e, "incoming migration connection ended"),
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
}
