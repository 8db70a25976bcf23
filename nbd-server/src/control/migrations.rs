//! Migrations through the control API: starting, resuming, cancelling and switching outgoing
//! ones, and the listener incoming ones arrive on.

use std::future::Future;
use std::sync::Arc;

use migration::ratelimit::SharedLink;
use migration::{Connector, LinkStream, MigrationReport, MigrationStatus, SourceConfig, Stage};
use tokio::net::{TcpListener, TcpStream};

use super::methods::StartMigration;
use super::ControlError;
use crate::admission::{Admission, AdmissionLimits};
use crate::link_socket::{LinkSocket, WatchedTcp};
use crate::node::{Node, NodeSourceHooks};

/// A link for a request that moves no disk (a plan).
pub(super) async fn connect(node: &Node, destination: &str) -> Result<LinkStream, ControlError> {
    connect_link(node.link_tls.clone(), node.link_socket.clone(), destination, None).await.map_err(unreachable)
}

fn unreachable(e: std::io::Error) -> ControlError {
    ControlError { kind: "unreachable", message: e.to_string() }
}

/// A migration link: TLS over TCP, or plain TCP with `--migration-insecure`. With `shared`,
/// the gang (or the migration alone) can read the connection's send queue.
async fn connect_link(
    tls: Option<crate::link_tls::LinkTls>,
    socket: LinkSocket,
    destination: &str,
    shared: Option<Arc<SharedLink>>,
) -> std::io::Result<LinkStream> {
    let stream = TcpStream::connect(destination)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {destination}: {e}")))?;
    socket.apply(&stream);
    match shared {
        Some(shared) => secure(tls, WatchedTcp::new(stream, &shared), destination).await,
        None => secure(tls, stream, destination).await,
    }
}

async fn secure<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static>(
    tls: Option<crate::link_tls::LinkTls>,
    stream: S,
    destination: &str,
) -> std::io::Result<LinkStream> {
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

/// Connects to one destination, again after each lost link; each connection's send queue is
/// watched through `shared`.
fn connector(node: &Node, destination: &str, shared: Arc<SharedLink>) -> Arc<dyn Connector> {
    let (tls, socket, destination) = (node.link_tls.clone(), node.link_socket.clone(), destination.to_string());
    Arc::new(move || {
        let (tls, socket, destination, shared) = (tls.clone(), socket.clone(), destination.clone(), shared.clone());
        async move { connect_link(tls, socket, &destination, Some(shared)).await }
    })
}

pub(super) async fn start_migration(node: &Arc<Node>, req: StartMigration) -> Result<String, ControlError> {
    node.store.disk(&req.disk)?;
    if let Some(gang) = &req.gang {
        if gang.is_empty() || gang.len() > 128 || gang.chars().any(char::is_control) {
            return Err(ControlError {
                kind: "invalid",
                message: format!("gang name {gang:?}: give 1 to 128 printable characters"),
            });
        }
    }
    if node.migrations().iter().any(|m| m.disk == req.disk && m.role == "source" && !m.is_finished()) {
        return Err(ControlError { kind: "busy", message: format!("disk {:?} is already migrating", req.disk) });
    }
    let shared = node.cap_for(req.gang.as_deref());
    // Fail fast when the destination cannot be reached at all (a later lost link is retried).
    let first = connect_link(node.link_tls.clone(), node.link_socket.clone(), &req.destination, Some(shared.clone()))
        .await
        .map_err(unreachable)?;
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
        delta: req.delta.unwrap_or(defaults.delta),
        unnamed_blocks: defaults.unnamed_blocks,
        want_listed: defaults.want_listed,
        gang: req.gang.clone(),
        restarted_at: None,
    };
    let status =
        MigrationStatus::with_cap(MigrationReport::new(&id, &req.disk, "source", &req.destination), shared.clone());
    node.register_migration(&id, status.clone());
    let first = parking_lot::Mutex::new(Some(first));
    let reconnect = connector(node, &req.destination, shared);
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
pub(super) fn resume_migration(node: &Arc<Node>, id: &str) -> Result<(), ControlError> {
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
    // The cap in force: as recorded, or as changed since the restart (`migrate set-bandwidth`
    // on the interrupted migration).
    let config = SourceConfig {
        restarted_at: Some(record.stage),
        bandwidth_bps: status.report().bandwidth_bps,
        ..record.config.clone().unwrap_or_default()
    };
    status.update(|r| r.cancellable = record.stage == Stage::PreCopy);
    if cancel {
        let _ = status.request_cancel();
    }
    tracing::info!(id = %record.id, disk = %record.disk, stage = ?record.stage, "resuming an outgoing migration after a restart");
    let connector = connector(node, &record.peer, status.shared_link());
    spawn_source(node, &record.disk, connector, config, status);
}

pub(super) async fn cancel_migration(node: &Arc<Node>, id: &str) -> Result<(), ControlError> {
    let status = node
        .migration_status(id)
        .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })?;
    let role = status.report().role;
    if role == "destination" {
        return node.destination.cancel(id).await.map_err(|e| ControlError { kind: "invalid", message: e.to_string() });
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

pub(super) fn refused(e: migration::RequestError) -> ControlError {
    ControlError { kind: "invalid", message: e.to_string() }
}

/// How long `migration.switch` waits for the destination to serve the disk.
const SWITCH_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The switch-over on command (the hypervisor's hook when it pauses the VM): freezes the
/// source export, sends the final listing and SWITCH, and returns once the destination
/// serves the disk, with the downtime in the report.
pub(super) async fn switch_migration(node: &Arc<Node>, id: &str) -> Result<MigrationReport, ControlError> {
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
            node.link_socket.apply(&stream);
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
