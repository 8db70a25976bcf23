//! What the server exports: block devices, wrapped in named [`Export`]s that live in a
//! shared [`ExportRegistry`].
//!
//! * [`BlockDevice`] is the storage interface: synchronous methods that may block (RocksDB,
//!   disk, network). The connection code only ever calls them from its own threads,
//!   never on a runtime worker thread.
//! * [`Export`] is a device plus everything the server decides per export: its name, whether
//!   it is read-only, whether writes are frozen (for migration switch-over), counters. The
//!   device behind an export can be replaced at runtime.
//! * [`ExportRegistry`] maps names to exports. Connections look the export up once, during
//!   negotiation; exports can be added, removed and replaced while the server runs.

#[cfg(feature = "cas")]
mod cas;
mod memory;
#[cfg(feature = "cas")]
mod migrating;
mod registry;
mod stats;
mod write_behind;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::Notify;

#[cfg(feature = "cas")]
pub use cas::CasDevice;
pub use memory::MemDevice;
#[cfg(feature = "cas")]
pub use migrating::MigratingDevice;
pub use registry::ExportRegistry;
pub use stats::{ExportStats, Op, OpSnapshot, StatsSnapshot};
pub use write_behind::{EarlyWrite, Reach, WritesBehind};

use crate::proto::Errno;

/// A range of a device and whether it holds data. `allocated == false` means a hole that
/// reads as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub allocated: bool,
}

/// Errors a device reports; each maps to one NBD error value ([`DeviceError::errno`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A write that does not fit (past the end, or out of space): `ENOSPC`.
    #[error("no space: {0}")]
    NoSpace(String),
    /// A request the device cannot make sense of (e.g. a read past the end): `EINVAL`.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The device refuses writes: `EPERM`.
    #[error("device is read-only")]
    ReadOnly,
    /// An optional feature (fast zeroing) the device cannot do: `ENOTSUP`.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The device is going away (e.g. its disk was deleted): `ESHUTDOWN`.
    #[error("device shut down: {0}")]
    Shutdown(String),
    /// Anything else (I/O, storage engine, corruption): `EIO`.
    #[error("I/O error: {0}")]
    Io(String),
}

impl DeviceError {
    /// The NBD error value for this error.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::NoSpace(_) => Errno::NoSpc,
            DeviceError::InvalidArgument(_) => Errno::Inval,
            DeviceError::ReadOnly => Errno::Perm,
            DeviceError::NotSupported(_) => Errno::NotSup,
            DeviceError::Shutdown(_) => Errno::Shutdown,
            DeviceError::Io(_) => Errno::Io,
        }
    }
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// Storage behind an export.
///
/// Methods may block for as long as they need: the server calls them on a blocking thread
/// pool, several at once (the trait is `Sync`), possibly for overlapping ranges (NBD clients
/// do not promise otherwise, and ordering between concurrent overlapping writes is up to the
/// device). Ranges are checked by the server against [`size`](BlockDevice::size) before any
/// call, so a device only sees in-range requests unless its size shrank in between.
///
/// Durability contract (what FLUSH and FUA promise the client):
/// * `write`/`write_zeroes`/`trim` with `fua == true` return only once that change is durable;
/// * `flush` returns only once every change that had *returned* before it started is durable.
///
/// The server advertises CAN_MULTI_CONN when [`can_multi_conn`](BlockDevice::can_multi_conn)
/// is true, so `flush` must cover writes made through every connection, not just one.
pub trait BlockDevice: Send + Sync + fmt::Debug + 'static {
    /// Size in bytes (the server advertises it and checks requests against it).
    fn size(&self) -> u64;

    /// The size at which aligned I/O is efficient (advertised as the preferred block size;
    /// must be a power of two between 512 and 2^25).
    fn preferred_block_size(&self) -> u32 {
        4096
    }

    /// Fills all of `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()>;

    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DeviceResult<()>;

    /// Writes several requests that were read together (no order among them: NBD orders
    /// none between requests in flight), one result each. With `fua`, all are durable when
    /// it returns. The default writes them one after the other; a device that can commit
    /// them as one says so with [`groups_writes`](BlockDevice::groups_writes).
    fn write_many(&self, writes: &[(u64, &[u8])], fua: bool) -> Vec<DeviceResult<()>> {
        writes.iter().map(|(offset, data)| self.write(*offset, data, fua)).collect()
    }

    /// Whether [`write_many`](BlockDevice::write_many) is cheaper than the writes one by
    /// one: the server then hands it the small writes it finds waiting together.
    fn groups_writes(&self) -> bool {
        false
    }

    /// Makes `len` bytes at `offset` read as zeroes. `no_hole` asks that the range stay
    /// allocated; a device that never preallocates may ignore it.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> DeviceResult<()>;

    /// Discards `len` bytes at `offset` (afterwards they may read as anything; the CAS store
    /// reads them as zeroes).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> DeviceResult<()>;

    /// Makes every completed change durable.
    fn flush(&self) -> DeviceResult<()>;

    /// Allocation status of `[offset, offset + len)`: extents in increasing order. They may
    /// stop short of the end (the client asks again) but must start at `offset`; gaps are
    /// reported as allocated.
    fn block_status(&self, offset: u64, len: u64) -> DeviceResult<Vec<Extent>>;

    /// A hint that the range will be read soon. The default does nothing.
    fn cache(&self, offset: u64, len: u64) -> DeviceResult<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// A device that can never be written (the server then advertises READ_ONLY).
    fn is_read_only(&self) -> bool {
        false
    }

    /// Whether `write_zeroes` is cheaper than writing zeroes (`NBD_CMD_FLAG_FAST_ZERO`
    /// requests fail with `ENOTSUP` otherwise).
    fn supports_fast_zero(&self) -> bool {
        true
    }

    /// Whether all connections share one cache, so FLUSH on one covers writes of all.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Whether a read or write may wait for something slow besides local storage (a
    /// post-copy fetch over the WAN). The server then never lets one request hold up the
    /// reading of the next.
    fn may_wait(&self) -> bool {
        false
    }

    /// Whether the server may answer a WRITE without FUA once it is admitted, before this
    /// device's call returns (see [`WritesBehind`]): worth it for a device whose writes cost
    /// more than a copy into a cache. The server keeps every later request, on any
    /// connection, seeing the write, and FLUSH waits for it. The default answers after.
    fn writes_behind(&self) -> bool {
        false
    }
}

/// In `Export::write_gate`: set while writes are frozen.
const FROZEN: u64 = 1 << 63;

/// A named block device as served to clients.
///
/// Shared as `Arc<Export>` by the registry and every connection using it. All state changes
/// are immediate and visible to existing connections on their next request:
/// * [`set_read_only`](Export::set_read_only): writes get `EPERM` (clients that negotiated
///   while writable were told it was writable; clients negotiating later see READ_ONLY);
/// * [`freeze`](Export::freeze) / [`thaw`](Export::thaw): new writes are *held* (not
///   refused: a running guest must not see an I/O error because its disk is moving), and
///   `freeze` waits for writes already running to finish (the migration switch-over);
/// * [`mark_moved`](Export::mark_moved): the disk now lives on another server; held and new
///   reads and writes get `ESHUTDOWN` saying so, FLUSH still succeeds (QEMU flushes its drives
///   when it completes its own migration and when it quits, and fails if that flush fails);
/// * [`replace_device`](Export::replace_device): requests from then on go to the new device;
/// * [`close`](Export::close): every request gets `ESHUTDOWN` (the client then disconnects);
///   negotiation no longer offers the export.
pub struct Export {
    name: String,
    description: String,
    device: RwLock<Arc<dyn BlockDevice>>,
    read_only: AtomicBool,
    /// Writes in flight (low bits) and the FROZEN bit.
    write_gate: AtomicU64,
    writes_drained: Notify,
    /// Writes of connections that ended without DISC and are still running on the device.
    orphaned_writes: AtomicU64,
    orphans_done: Notify,
    closed: AtomicBool,
    /// The disk moved to another server (a migration's switch-over).
    moved: AtomicBool,
    /// Wakes writes held by a freeze (thaw, move or close).
    unfrozen: Notify,
    /// Writes answered before their device call returned, shared by all connections.
    writes_behind: WritesBehind,
    stats: ExportStats,
}

/// How long a write waits at a frozen export before it fails with `EIO`. A switch-over holds
/// writes for milliseconds; a hold this long means the migration is stuck, and the guest is
/// better told than left waiting.
pub const FREEZE_HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Why a write was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteRefused {
    #[error("the disk moved to another server (migration)")]
    Moved,
    #[error("the export was closed")]
    Closed,
    #[error("the export stayed frozen for longer than the hold limit")]
    HeldTooLong,
}

impl WriteRefused {
    pub fn errno(self) -> Errno {
        match self {
            WriteRefused::Moved | WriteRefused::Closed => Errno::Shutdown,
            WriteRefused::HeldTooLong => Errno::Io,
        }
    }
}

impl Export {
    /// An export of `device` under `name` (read-only if the device is).
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            read_only: AtomicBool::new(false),
            device: RwLock::new(device),
            write_gate: AtomicU64::new(0),
            writes_drained: Notify::new(),
            orphaned_writes: AtomicU64::new(0),
            orphans_done: Notify::new(),
            closed: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            unfrozen: Notify::new(),
            writes_behind: WritesBehind::default(),
            stats: ExportStats::default(),
        }
    }

    /// Sets the human-readable description (sent with NBD_INFO_DESCRIPTION and NBD_OPT_LIST).
    pub fn with_description(mut self, description: impl Into<String>) -> Export {
        self.description = description.into();
        self
    }

    /// Starts read-only (or not).
    pub fn with_read_only(self, read_only: bool) -> Export {
        self.read_only.store(read_only, Ordering::SeqCst);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// The current device. Hold the `Arc` for the duration of one request only, so that
    /// [`replace_device`](Export::replace_device) takes effect promptly.
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        self.device.read().clone()
    }

    /// Swaps the device; returns the old one. Requests already running finish on the old
    /// device (call [`freeze`](Export::freeze) first to have none of them be writes).
    pub fn replace_device(&self, device: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
        std::mem::replace(&mut *self.device.write(), device)
    }

    /// Current size of the device.
    pub fn size(&self) -> u64 {
        self.device.read().size()
    }

    /// Whether writes are refused with `EPERM` (by setting or because the device is).
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst) || self.device.read().is_read_only()
    }

    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::SeqCst);
    }

    /// Holds new writes (WRITE, WRITE_ZEROES and TRIM wait for their admission) and waits
    /// until the writes already admitted have finished. When it returns, the device sees no
    /// more writes until [`thaw`](Export::thaw). Reads, FLUSH and BLOCK_STATUS keep working.
    pub async fn freeze(&self) {
        self.write_gate.fetch_or(FROZEN, Ordering::SeqCst);
        loop {
            let drained = self.writes_drained.notified();
            tokio::pin!(drained);
            // Register before checking, so a wake-up between the check and the await is kept.
            drained.as_mut().enable();
            if self.writes_in_flight() == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Accepts writes again; held writes go ahead.
    pub fn thaw(&self) {
        self.write_gate.fetch_and(!FROZEN, Ordering::SeqCst);
        self.unfrozen.notify_waiters();
    }

    /// The disk now lives on another server: held and later writes and reads get
    /// `ESHUTDOWN`; FLUSH still reaches the device. Stays frozen.
    pub fn mark_moved(&self) {
        self.write_gate.fetch_or(FROZEN, Ordering::SeqCst);
        self.moved.store(true, Ordering::SeqCst);
        self.unfrozen.notify_waiters();
    }

    pub fn is_moved(&self) -> bool {
        self.moved.load(Ordering::SeqCst)
    }

    pub fn is_frozen(&self) -> bool {
        self.write_gate.load(Ordering::SeqCst) & FROZEN != 0
    }

    /// Writes admitted and not yet finished.
    pub fn writes_in_flight(&self) -> u64 {
        self.write_gate.load(Ordering::SeqCst) & !FROZEN
    }

    /// Ends the export for good: every request gets `ESHUTDOWN`, negotiation refuses it.
    /// Usually paired with [`ExportRegistry::remove`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.unfrozen.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The writes answered early and still running on the device.
    pub fn writes_behind(&self) -> &WritesBehind {
        &self.writes_behind
    }

    /// Request and byte counters.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// Writes still running on the device for connections that are gone (no DISC).
    pub fn orphaned_writes(&self) -> u64 {
        self.orphaned_writes.load(Ordering::SeqCst)
    }

    /// Waits (at most `timeout`) until no write of a dead connection is still running on the
    /// device. Negotiation calls this before a connection enters transmission: a client that
    /// reconnects after losing a connection must not have a stale write of the old one land
    /// after its new writes. Returns false on timeout.
    pub async fn wait_for_orphaned_writes(&self, timeout: std::time::Duration) -> bool {
        let wait = async {
            loop {
                let done = self.orphans_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if self.orphaned_writes() == 0 {
                    return;
                }
                done.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    pub(crate) fn add_orphaned_writes(&self, n: u64) {
        if n > 0 {
            self.orphaned_writes.fetch_add(n, Ordering::SeqCst);
        }
    }

    pub(crate) fn orphaned_write_done(&self) {
        if self.orphaned_writes.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.orphans_done.notify_waiters();
        }
    }

    /// Admits one write if the export is not frozen (no waiting, no allocation).
    pub(crate) fn try_admit_write(self: &Arc<Self>) -> Option<WriteGuard> {
        // As in `admit_write`: count first, then look at the bit.
        let previous = self.write_gate.fetch_add(1, Ordering::SeqCst);
        let guard = WriteGuard { export: Arc::clone(self) };
        (previous & FROZEN == 0).then_some(guard)
    }

    /// Admits one write; while the export is frozen, waits (at most `limit`) for it to
    /// thaw. The guard counts the write as in flight.
    pub(crate) async fn admit_write(self: &Arc<Self>, limit: std::time::Duration) -> Result<WriteGuard, WriteRefused> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let unfrozen = self.unfrozen.notified();
            tokio::pin!(unfrozen);
            // Registered before the check, so a thaw between the check and the wait counts.
            unfrozen.as_mut().enable();
            // Increment first, then look at the bit: a concurrent `freeze` either sees this
            // write counted or this write sees the bit (no window where neither happens).
            let previous = self.write_gate.fetch_add(1, Ordering::SeqCst);
            let guard = WriteGuard { export: Arc::clone(self) };
            if previous & FROZEN == 0 {
                return Ok(guard);
            }
            // Not admitted: uncount it (which may let `freeze` finish) and wait.
            drop(guard);
            if self.is_moved() {
                return Err(WriteRefused::Moved);
            }
            if self.is_closed() {
                return Err(WriteRefused::Closed);
            }
            if tokio::time::timeout_at(deadline, unfrozen).await.is_err() {
                return Err(WriteRefused::HeldTooLong);
            }
        }
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("device", &*self.device.read())
            .field("read_only", &self.is_read_only())
            .field("frozen", &self.is_frozen())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// One admitted write; dropping it (when the device call returns) lets `freeze` finish.
#[derive(Debug)]
pub(crate) struct WriteGuard {
    export: Arc<Export>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let previous = self.export.write_gate.fetch_sub(1, Ordering::SeqCst);
        if previous & FROZEN != 0 && previous & !FROZEN == 1 {
            self.export.writes_drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn export() -> Arc<Export> {
        Arc::new(Export::new("disk", Arc::new(MemDevice::new(1 << 20))))
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(DeviceError::NoSpace("x".into()).errno(), Errno::NoSpc);
        assert_eq!(DeviceError::InvalidArgument("x".into()).errno(), Errno::Inval);
        assert_eq!(DeviceError::ReadOnly.errno(), Errno::Perm);
        assert_eq!(DeviceError::NotSupported("x".into()).errno(), Errno::NotSup);
        assert_eq!(DeviceError::Shutdown("x".into()).errno(), Errno::Shutdown);
        assert_eq!(DeviceError::Io("x".into()).errno(), Errno::Io);
    }

    #[test]
    fn read_only_switch() {
        let e = export();
        assert!(!e.is_read_only());
        e.set_read_only(true);
        assert!(e.is_read_only());
        e.set_read_only(false);
        assert!(!e.is_read_only());
        let ro = Export::new("ro", Arc::new(MemDevice::new(4096).read_only()));
        assert!(ro.is_read_only());
    }

    #[tokio::test]
    async fn freeze_waits_for_writes_in_flight() {
        let e = export();
        let w1 = e.admit_write(Duration::ZERO).await.unwrap();
        let w2 = e.admit_write(Duration::ZERO).await.unwrap();
        assert_eq!(e.writes_in_flight(), 2);

        let frozen = {
            let e = e.clone();
            tokio::spawn(async move { e.freeze().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(e.is_frozen());
        assert!(!frozen.is_finished());
        // New writes are held while frozen (and not counted as in flight).
        let held = {
            let e = e.clone();
            tokio::spawn(async move { e.admit_write(Duration::from_secs(10)).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!held.is_finished());
        assert_eq!(e.writes_in_flight(), 2);
        drop(w1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!frozen.is_finished());
        drop(w2);
        tokio::time::timeout(Duration::from_secs(5), frozen).await.unwrap().unwrap();
        assert_eq!(e.writes_in_flight(), 0);

        e.thaw();
        assert!(!e.is_frozen());
        // The held write goes ahead.
        tokio::time::timeout(Duration::from_secs(5), held).await.unwrap().unwrap().unwrap();
        assert!(e.admit_write(Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn a_move_fails_held_writes_and_a_long_freeze_fails_with_eio() {
        let e = export();
        e.freeze().await;
        assert_eq!(e.admit_write(Duration::from_millis(30)).await.unwrap_err(), WriteRefused::HeldTooLong);
        let held = {
            let e = e.clone();
            tokio::spawn(async move { e.admit_write(Duration::from_secs(10)).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        e.mark_moved();
        let refused = tokio::time::timeout(Duration::from_secs(5), held).await.unwrap().unwrap().unwrap_err();
        assert_eq!(refused, WriteRefused::Moved);
        assert_eq!(refused.errno(), Errno::Shutdown);
        assert_eq!(e.writes_in_flight(), 0);
    }

    #[tokio::test]
    async fn freeze_with_nothing_in_flight_returns_at_once() {
        let e = export();
        tokio::time::timeout(Duration::from_secs(5), e.freeze()).await.unwrap();
        assert!(e.is_frozen());
    }

    #[test]
    fn replace_device_and_close() {
        let e = export();
        assert_eq!(e.size(), 1 << 20);
        let old = e.replace_device(Arc::new(MemDevice::new(8192)));
        assert_eq!(old.size(), 1 << 20);
        assert_eq!(e.size(), 8192);
        assert!(!e.is_closed());
        e.close();
        assert!(e.is_closed());
    }
}
