//! Migration of a disk between two block stores (two datacentres).
//!
//! The source lists the fingerprints of a consistent snapshot of the disk's map; the
//! destination maps every block it already holds (its neighbours' blocks) at once and asks
//! for each missing fingerprint once; the source sends those blocks in zstd frames at a level
//! that follows the link. Writes during the copy are tracked in the disk's dirty bitmap and
//! listed again in rounds. At the switch-over the source export is frozen, the final dirty
//! blocks are listed, and the destination serves the disk at once, fetching any block it
//! still lacks on demand while the rest arrives in the background.
//!
//! See [`protocol`] for the wire format, the message diagram, the state machines and the
//! version policy. The crate knows nothing of NBD: a server plugs in through
//! [`source::SourceHooks`] and [`destination::DestHooks`], and serves a
//! [`destination::MigratingDisk`] (standby before the switch-over, post-copy after it).

pub mod compress;
pub mod delta;
pub mod destination;
pub mod link;
pub mod protocol;
pub mod ratelimit;
mod recent;
pub mod report;
pub mod sched;
pub mod source;
pub mod state;
pub mod stream;
pub mod wire;

pub use destination::{incoming_name, run_destination, run_destination_windowed, DestHooks, Destination, MigratingDisk, PostCopyError, LISTING_WINDOW_BLOCKS};
pub use link::{Connector, LinkIo, LinkStream, OneShot};
pub use report::{MigrationReport, Phase, PlanReport, SwitchAfter};
pub use source::{run_plan, run_source, run_source_with, HookError, MigrationStatus, NoHooks, RequestError, SourceConfig, SourceHooks};
pub use state::{FileStateStore, MemStateStore, MigrationRecord, Stage, StateStore};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("link: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("store: {0}")]
    Store(#[from] cas_store::StoreError),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("unexpected {0} from the peer")]
    Unexpected(&'static str),
    #[error("the peer closed the connection")]
    Closed,
    #[error("corrupt data from the peer: {0}")]
    Corrupt(String),
    #[error("server: {0}")]
    Hook(String),
    #[error("cancelled by the operator")]
    Cancelled,
    /// Internal: the destination asked for a fresh listing; the source starts it over.
    #[error("the listing starts over")]
    Restart,
    /// A newer connection of the same migration took over.
    #[error("a newer connection took over")]
    Superseded,
    /// Internal: a resumed link found the destination already switched.
    #[error("the destination already switched")]
    AlreadySwitched(protocol::DestReport),
}

/// Runs a short blocking step inside a switch-over's downtime on the runtime's switch-over
/// thread ([`sched::on_switch_thread`]), not on the blocking pool: a pool thread would first
/// have to be scheduled, and the pool's threads neither preempt on wake-up nor have the
/// workers' short slices (see `sched`); a trace showed that hand-off taking 2.7 ms on a busy
/// gang. Where the runtime has no such thread (tests, tools), on this worker (tokio's
/// `block_in_place`), or on the pool on a single-threaded runtime, where `block_in_place` is
/// not allowed.
pub(crate) async fn blocking_now<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, MigrationError>
where
    T: Send + 'static,
    E: Into<MigrationError> + Send + 'static,
{
    let f = match sched::on_switch_thread(f) {
        Ok(done) => {
            return match done.await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(MigrationError::Hook("the switch-over thread dropped a step".into())),
            }
        }
        Err(f) => f,
    };
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(f).map_err(Into::into)
    } else {
        blocking(f).await
    }
}

/// Runs store work on tokio's blocking pool (RocksDB calls never run on a worker thread).
pub(crate) async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, MigrationError>
where
    T: Send + 'static,
    E: Into<MigrationError> + Send + 'static,
{
    // Blocking work never preempts the async workers that hand it out (see `sched`).
    let f = move || {
        sched::as_pool();
        f()
    };
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(MigrationError::Hook(format!("blocking task failed: {e}"))),
    }
}
