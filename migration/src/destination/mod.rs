//! The destination side: maps every listed block it already holds, asks for the rest once
//! each, verifies and stores what arrives, switches over on request, and then serves the disk
//! through a [`MigratingDisk`]: a standby export from the moment the migration arrives (reads
//! through to the source, writes held), then post-copy (missing blocks fetched on demand).

mod apply;
mod backlog;
mod connection;
mod gang;
mod journal;
mod plan;
mod postcopy;
mod registry;
mod restore;
mod state;
mod switch;

pub use connection::LISTING_WINDOW_BLOCKS;
pub use postcopy::{MigratingDisk, PostCopyError};
pub use registry::{CancelError, Destination};
// The submodules share their crate-internal items through this module.
use {apply::*, backlog::*, connection::*, gang::*, journal::*, plan::*, postcopy::*, registry::*, state::*, switch::*};

use std::sync::Arc;
use std::time::Duration;

use cas_store::Store;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::protocol::{ErrorMessage, Hello, Message};
use crate::report::{MigrationReport, Phase};
use crate::source::MigrationStatus;
use crate::MigrationError;

/// What the destination server does at the edges of a migration.
pub trait DestHooks: Send + Sync {
    /// A migration of disk `name` arrived (or was restored after a restart): serve `disk`
    /// under the disk's real name from now on. It is a standby export until the switch-over
    /// (the destination host attaches it when it creates the incoming VM) and the writable
    /// disk after it; the same connections go on across the switch.
    fn attach(&self, name: &str, disk: Arc<MigratingDisk>) -> Result<(), crate::source::HookError>;
    /// The switch-over happened: this server is authoritative for `name` now.
    fn switched(&self, _name: &str) {}
    /// Every block is local; the export may serve the store's disk directly again.
    fn complete(&self, name: &str);
    /// The migration ended before the switch-over: stop serving the standby export (its
    /// held requests fail; the source keeps the disk).
    fn abandoned(&self, _name: &str) {}
    /// A migration arrived (or was restored after a restart): the server lists it.
    fn registered(&self, _id: &str, _status: Arc<MigrationStatus>) {}
}

/// Serves one incoming migration connection to completion with no resume (tests and tools):
/// a lost link parks nothing anyone will come back for.
pub async fn run_destination<S>(
    store: Arc<Store>,
    stream: S,
    hooks: Arc<dyn DestHooks>,
    status: Arc<MigrationStatus>,
) -> Result<MigrationReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    run_destination_windowed(store, stream, hooks, status, LISTING_WINDOW_BLOCKS).await
}

/// [`run_destination`] with another listing window (see [`Destination::set_listing_window`]).
pub async fn run_destination_windowed<S>(
    store: Arc<Store>,
    stream: S,
    hooks: Arc<dyn DestHooks>,
    status: Arc<MigrationStatus>,
    listing_window: usize,
) -> Result<MigrationReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let dest = Destination::new(store, hooks, Arc::new(crate::state::MemStateStore::default()), Duration::ZERO);
    dest.set_listing_window(listing_window);
    let result = dest.serve(stream, status.clone()).await;
    if let Err(e) = &result {
        let sessions: Vec<Arc<Session>> = dest.sessions.lock().values().cloned().collect();
        for s in sessions {
            dest.fail(&s, e).await;
        }
        if !status.report().is_finished() {
            status.finish(Phase::Failed, Some(e.to_string()));
        }
    }
    result
}

fn check_hello(store: &Store, hello: &Hello) -> Result<(), String> {
    if hello.block_size != store.block_size() {
        return Err(format!("block size {} differs from this store's {}", hello.block_size, store.block_size()));
    }
    if hello.algorithm != store.algorithm().name() {
        return Err(format!("fingerprint algorithm {} differs from this store's {}", hello.algorithm, store.algorithm()));
    }
    Ok(())
}

/// Checks for a new (not resumed) migration.
fn check_new(store: &Store, hello: &Hello) -> Result<(), String> {
    {
        if store.disk(&hello.disk).is_ok() {
            return Err(format!("disk {:?} already exists at the destination", hello.disk));
        }
        if store.disk(&incoming_name(&hello.disk)).is_ok() {
            return Err(format!("a migration of {:?} is already arriving here", hello.disk));
        }
        if hello.size % 512 != 0 {
            return Err(format!("size {} is not a multiple of 512", hello.size));
        }
    }
    Ok(())
}

/// The name an arriving disk has until the switch-over: it is never exported under its real
/// name while partial.
pub fn incoming_name(disk: &str) -> String {
    format!("{disk}.incoming")
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, why: &str, status: &MigrationStatus) {
    tracing::warn!(reason = why, "refusing a migration");
    let _ = crate::wire::write_message(stream, &Message::Error(ErrorMessage { message: why.to_string() }), &status.traffic).await;
    let _ = stream.shutdown().await;
}
