//! The store: disks made of block maps over content-addressed, reference-counted blocks.
//!
//! Split by concern: the catalogue of disks (`catalog`), disk I/O (`io`), the commit of map and
//! reference changes (`commit`) and their journal (`refs_log`, with the map's side in
//! `map_overlay`), reading the block map through the journal's overlay (`map_view`) and the
//! write path's map cache (`map_cache`), block bytes and their locations (`blocks`), what migration
//! needs (`migration`), accounting and checking (`fsck`), compaction of containers
//! (`compaction`), and the conversion of stores of the previous format (`upgrade`).
//!
//! # Concurrency
//! - A disk's *layout lock* is taken shared by every I/O and exclusively by resize and delete,
//!   so blocks are never released under a running request.
//! - *Block stripes* (reader-writer locks hashed from disk and block number) serialise the
//!   read-modify-write of one block; writes to different blocks proceed concurrently.
//! - *Fingerprint stripes* serialise reading a reference count and committing its new value, so
//!   two writers can never both decide that a block is new, or that it is dead. Compaction
//!   moves a block under its fingerprint stripe too.
//! - Locks are taken in that order (layout, blocks, fingerprints), each group in ascending
//!   index order, so there is no cycle.
//!
//! With local blocks (containers), new blocks are appended to a container before the batch
//! that names them, and a map entry and the reference-count changes it causes go in one atomic
//! batch (as journal records: see `refs_log`). With an external pool (blocks shared by many stores, see [`crate::pool`]) the store
//! claims new blocks in the pool before committing the batch and releases dead ones after it,
//! still under the fingerprint stripes: a crash can leak a reference, never leave a map entry
//! naming a block that is not stored. A reader that holds a block's stripe sees a map entry
//! whose block is stored: the entry itself holds a reference, and only a writer of the same
//! block (excluded by the stripe) can drop it.

mod blocks;
mod catalog;
mod commit;
mod compaction;
mod fsck;
mod io;
mod map_cache;
mod map_overlay;
mod map_view;
mod migration;
mod refs_log;
mod sketches;
mod slot_reuse;
mod snapshot;
mod types;
mod upgrade;

pub use compaction::CompactionStop;
pub use migration::MapSnapshot;
pub use sketches::SketchReport;
pub use types::*;
pub use upgrade::UpgradeReport;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::cache::BlockCache;
use crate::container::{ContainerDir, ContainerIds, Containers, FsContainerDir, MemContainerDir};
use crate::dirty::DirtyBitmap;
use crate::engine::{Cf, KvEngine, MemEngine, RocksEngine, RocksTuning, WriteBatch};
use crate::keys::*;
use crate::pool::{BlockPool, PoolSettings};
use crate::{Fingerprint, FingerprintAlgorithm, Result, StoreError};

/// Blocks committed per batch. Bounds lock hold times and batch sizes for large requests; a
/// request larger than this is not atomic as a whole (NBD does not ask it to be).
const CHUNK_BLOCKS: u64 = 256;
const BLOCK_STRIPES: usize = 1024;
/// Reads of more blocks than this at once bypass filling the hot-block cache (external pool).
const SCAN_BLOCKS: u64 = 32;
/// Many, so that two concurrent commits of a few hundred random fingerprints each rarely share
/// a stripe: two chunks of 256 new blocks share about 256 * 256 / stripes of them, and when
/// they share one the second waits for the first's whole commit. With 64 Ki stripes that was
/// one on average (the two chunks of a 2 MiB write serialized nearly two times in three:
/// 0.5 s of a 2 GiB write's 2.3 s of commits went to waiting for stripes); with 1 Mi, one
/// pair in sixteen (0.12-0.18 s). A stripe is one byte (`parking_lot::Mutex<()>`): 1 MiB.
const FINGERPRINT_STRIPES: usize = 1 << 20;
/// Format of a store whose blocks were values in its own RocksDB (before containers). Opening
/// one is refused with the command that converts it ([`Store::upgrade`]).
const FORMAT_VERSION_ENGINE_BLOCKS: u32 = 1;
/// Format of a store whose blocks are in an external pool: builds that predate pools refuse
/// it rather than open a store whose blocks they cannot see.
const FORMAT_VERSION_EXTERNAL: u32 = 2;
/// Format of a store whose blocks are in append-only containers beside its engine.
const FORMAT_VERSION_CONTAINERS: u32 = 3;
/// Fingerprints looked up in the pool per batch by fsck and repair.
const POOL_BATCH: usize = 1024;
/// The directory of the containers, inside the store's directory.
pub const CONTAINERS_DIR: &str = "containers";

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Block size for a new store (a power of two, 512..=65536; default 4096). When opening an
    /// existing store, `None` accepts what it was created with and `Some` must match it.
    pub block_size: Option<u32>,
    /// Fingerprint algorithm, with the same rule as `block_size` (default BLAKE3-128).
    pub algorithm: Option<FingerprintAlgorithm>,
    /// Bytes of the hot-block cache in front of an external pool (0 disables it). Local blocks
    /// are read from the page cache and need none.
    pub cache_bytes: usize,
    pub rocks: RocksTuning,
    /// Where the blocks live. None: in the store's own containers (one machine). Some: an
    /// external pool shared with other stores (RADOS: see the `cas-rados` crate). The choice
    /// is recorded when the store is created; reopening with another pool is refused.
    pub pool: Option<Arc<dyn BlockPool>>,
    /// Size of a block container (default 64 MiB): the unit compaction rewrites.
    pub container_bytes: u64,
    /// Re-hash every block read from a container and fail the read on a mismatch (a disk that
    /// returned other bytes). Off by default: the fingerprint is the checksum fsck verifies.
    pub verify_reads: bool,
    /// Threads one large write uses at most: its chunks of [`CHUNK_BLOCKS`] blocks are hashed
    /// and committed in parallel (1: one after the other). Clients that keep one large write in
    /// flight at a time (`qemu-img convert` without `-W`) would otherwise leave all but one
    /// core idle. Default: the CPUs available, at most 4.
    pub write_threads: usize,
    /// Small writes of new blocks take the slots of blocks that died (durably) instead of
    /// growing a container: a cached page and an allocated disk block overwritten, as a plain
    /// NBD server overwrites its file (see the containers' `free_slots`). Default on. The
    /// price: after a power loss (not a process crash), a block written and never flushed
    /// whose map entry RocksDB made durable on its own (a memtable flush) may read as the bytes
    /// a dead block left in its slot rather than as zeros; a store shared by tenants who must
    /// never see each other's old bytes turns it off (or sets `verify_reads`).
    pub reuse_dead_slots: bool,
    /// Block map entries the write path keeps at hand (48 bytes each, allocated as they fill;
    /// default 512 Ki: 24 MiB): a small write's old entries come from there instead of
    /// RocksDB's table files when the block was written or looked up before (see `map_cache`).
    pub map_cache_entries: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_size: None,
            algorithm: None,
            cache_bytes: 64 << 20,
            rocks: RocksTuning::default(),
            pool: None,
            container_bytes: 64 << 20,
            verify_reads: false,
            write_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            reuse_dead_slots: true,
            map_cache_entries: 512 << 10,
        }
    }
}

/// What a store records about itself at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoreConfig {
    format_version: u32,
    block_size: u32,
    algorithm: FingerprintAlgorithm,
    /// Absent: blocks in the store's containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blocks: Option<BlocksConfig>,
}

/// The external pool a store keeps its blocks in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BlocksConfig {
    /// [`BlockPool::kind`] ("rados").
    kind: String,
    /// [`BlockPool::location`] ("rados:POOL/NAMESPACE").
    location: String,
    /// The name this store's references carry in the pool.
    holder: String,
}

/// A name no other store will have: the holder of a new store's references in a shared pool.
fn new_holder_name() -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&SERIAL.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let marker = 0u8;
    h.update(&(std::ptr::addr_of!(marker) as usize).to_le_bytes());
    if let Ok(host) = std::fs::read("/etc/machine-id") {
        h.update(&host);
    }
    format!("store-{}", &h.finalize().to_hex()[..32])
}

#[derive(Debug)]
struct DiskState {
    id: DiskId,
    size: AtomicU64,
    deleted: AtomicBool,
    /// Shared by I/O, exclusive for resize and delete.
    layout: RwLock<()>,
    dirty: Mutex<Option<DirtyBitmap>>,
    /// A snapshot: I/O that would change the map is refused.
    read_only: bool,
    origin: Option<String>,
}

impl DiskState {
    fn new(id: DiskId, size: u64) -> DiskState {
        DiskState {
            id,
            size: AtomicU64::new(size),
            deleted: AtomicBool::new(false),
            layout: RwLock::new(()),
            dirty: Mutex::new(None),
            read_only: false,
            origin: None,
        }
    }

    fn from_meta(meta: &DiskMeta) -> DiskState {
        DiskState { read_only: meta.read_only, origin: meta.origin.clone(), ..DiskState::new(DiskId(meta.id), meta.size) }
    }

    /// The catalogue record of this disk at `size`.
    fn meta(&self, size: u64) -> DiskMeta {
        DiskMeta { id: self.id.0, size, read_only: self.read_only, origin: self.origin.clone() }
    }

    fn info(&self, name: &str) -> DiskInfo {
        DiskInfo { id: self.id, name: name.to_string(), size: self.size.load(Ordering::Acquire), read_only: self.read_only, origin: self.origin.clone() }
    }

    /// Refuses a change to a snapshot.
    fn check_writable(&self, name: impl FnOnce() -> String) -> Result<()> {
        if self.read_only {
            return Err(StoreError::ReadOnly(name()));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct DiskTable {
    by_name: HashMap<String, Arc<DiskState>>,
    names: HashMap<DiskId, String>,
}

/// Where a store's blocks are.
#[derive(Debug)]
enum Blocks {
    /// In append-only containers of this store; `refs` entries hold their locations. Shared
    /// with the reference journal's fold thread, which syncs them before the engine's log.
    Local(Arc<Containers>),
    /// In a pool many stores share; `refs` entries are this store's counts only.
    External(Arc<dyn BlockPool>),
}

/// Records the next container id in the engine before a container with the previous one is
/// created, so ids are never handed out twice (see [`crate::container`]).
struct EngineContainerIds<'a>(&'a dyn KvEngine);

impl ContainerIds for EngineContainerIds<'_> {
    fn reserve(&self, next: u32) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, NEXT_CONTAINER_ID_KEY, next.to_le_bytes());
        self.0.write(batch)
    }
}

/// What a block becomes in a commit.
enum Target<'a> {
    Zero,
    Data {
        fp: Fingerprint,
        bytes: std::borrow::Cow<'a, [u8]>,
    },
    /// A block already in the store (migration: a neighbour has it); skipped if it is not.
    Existing(Fingerprint),
}

/// Where the bytes of a range update come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Data(&'a [u8]),
    Zeroes,
}

/// A content-addressed block store holding disks. Cheap to share (`Arc<Store>`); every method
/// is synchronous and may block on the engine or the containers, so async callers run it on a
/// blocking pool.
pub struct Store {
    engine: Arc<dyn KvEngine>,
    blocks: Blocks,
    /// This store's name in an external pool ("" with local blocks).
    holder: String,
    block_size: u32,
    algorithm: FingerprintAlgorithm,
    /// Hot blocks of an external pool (disabled for local blocks: the page cache serves them).
    cache: BlockCache,
    verify_reads: bool,
    /// Commits record the slots of blocks that die, for new blocks to take.
    reuse_dead_slots: bool,
    write_threads: usize,
    block_stripes: Vec<RwLock<()>>,
    fingerprint_stripes: Vec<Mutex<()>>,
    /// Serialises catalogue changes (create, delete, rename, resize).
    catalog: Mutex<()>,
    /// One compaction pass (or fsck) at a time.
    compaction: Mutex<()>,
    /// Shared by commits from their container append to the batch naming the new slots;
    /// compaction takes it exclusively once, to wait for appends already under way.
    appends: RwLock<()>,
    disks: RwLock<DiskTable>,
    /// Reference changes journalled but not yet in `refs` (see `refs_log`).
    refs: Arc<refs_log::RefsLog>,
    /// The thread folding them into `refs`.
    refs_folder: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The thread making dead slots reusable (local blocks, `reuse_dead_slots`).
    slot_reuse: Mutex<Option<slot_reuse::SlotReuse>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.refs.stop_folding();
        if let Some(folder) = self.refs_folder.lock().take() {
            let _ = folder.join();
        }
        if let Some(mut reuse) = self.slot_reuse.lock().take() {
            reuse.stop();
        }
        // An orderly close leaves no journal behind (the next open would apply it anyway).
        if let Err(e) = self.fold_refs() {
            tracing::warn!(error = %e, "folding reference changes at close failed; the next open applies them");
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("engine", &self.engine)
            .field("blocks", &self.block_pool())
            .field("block_size", &self.block_size)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

fn is_zero(data: &[u8]) -> bool {
    // Sixteen bytes at a time; the compiler vectorises the comparison.
    let mut lanes = data.chunks_exact(16);
    lanes.by_ref().all(|l| u128::from_ne_bytes(l.try_into().expect("16 bytes")) == 0) && lanes.remainder().iter().all(|&b| b == 0)
}

fn out_of_range(offset: u64, length: u64, size: u64) -> StoreError {
    StoreError::OutOfRange { offset, length, size }
}

/// Reads a store's configuration, if it has one.
fn read_config(engine: &dyn KvEngine) -> Result<Option<StoreConfig>> {
    match engine.get(Cf::Meta, CONFIG_KEY)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("store configuration unreadable (made by a newer or a test build?): {e}"))),
    }
}

fn write_config(engine: &dyn KvEngine, config: &StoreConfig) -> Result<()> {
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, CONFIG_KEY, serde_json::to_vec(config).expect("serialisable"));
    engine.write(batch)?;
    engine.sync()
}

impl Store {
    /// Opens (creating on first use) a store in directory `path`: its RocksDB index there and
    /// its block containers in `path/containers`.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|e| StoreError::Engine(format!("creating {}: {e}", path.display())))?;
        let engine = RocksEngine::open(path, &opts.rocks)?;
        if let Some(config) = read_config(&engine)? {
            if config.format_version == FORMAT_VERSION_ENGINE_BLOCKS && config.blocks.is_none() {
                return Err(StoreError::FormatUpgrade { path: path.display().to_string(), found: config.format_version, current: FORMAT_VERSION_CONTAINERS });
            }
        }
        let dir = FsContainerDir::open(&path.join(CONTAINERS_DIR))?;
        Store::with_parts(Arc::new(engine), Arc::new(dir), opts)
    }

    /// A store that lives in memory only (tests, other crates' tests).
    pub fn open_in_memory(opts: StoreOptions) -> Result<Store> {
        Store::with_engine(Arc::new(MemEngine::new()), opts)
    }

    /// A store on any engine, with its containers (if it keeps blocks itself) in memory.
    pub fn with_engine(engine: Arc<dyn KvEngine>, opts: StoreOptions) -> Result<Store> {
        Store::with_parts(engine, Arc::new(MemContainerDir::default()), opts)
    }

    /// A store on any engine and any container directory.
    pub fn with_parts(engine: Arc<dyn KvEngine>, containers: Arc<dyn ContainerDir>, opts: StoreOptions) -> Result<Store> {
        let pool = opts.pool.clone();
        let requested_blocks = pool.as_ref().map_or_else(|| "containers".to_string(), |p| p.location());
        let config = match read_config(engine.as_ref())? {
            Some(stored) => {
                let expected_version = if stored.blocks.is_some() { FORMAT_VERSION_EXTERNAL } else { FORMAT_VERSION_CONTAINERS };
                if stored.format_version == FORMAT_VERSION_ENGINE_BLOCKS && stored.blocks.is_none() {
                    return Err(StoreError::FormatUpgrade { path: format!("{engine:?}"), found: stored.format_version, current: expected_version });
                }
                if stored.format_version != expected_version {
                    return Err(StoreError::ConfigMismatch {
                        setting: "format version",
                        stored: stored.format_version.to_string(),
                        requested: expected_version.to_string(),
                    });
                }
                let stored_blocks = stored.blocks.as_ref().map_or("containers", |b| b.location.as_str());
                let same_pool = match (&stored.blocks, &pool) {
                    (None, None) => true,
                    (Some(b), Some(p)) => b.kind == p.kind() && b.location == p.location(),
                    _ => false,
                };
                if !same_pool {
                    return Err(StoreError::ConfigMismatch { setting: "block pool", stored: stored_blocks.to_string(), requested: requested_blocks });
                }
                if let Some(bs) = opts.block_size.filter(|&bs| bs != stored.block_size) {
                    return Err(StoreError::ConfigMismatch { setting: "block size", stored: stored.block_size.to_string(), requested: bs.to_string() });
                }
                if let Some(a) = opts.algorithm.filter(|&a| a != stored.algorithm) {
                    return Err(StoreError::ConfigMismatch {
                        setting: "fingerprint algorithm",
                        stored: stored.algorithm.to_string(),
                        requested: a.to_string(),
                    });
                }
                stored
            }
            None => {
                let block_size = opts.block_size.unwrap_or(4096);
                if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
                    return Err(StoreError::InvalidArgument(format!("block size {block_size} is not a power of two from 512 to 65536")));
                }
                let blocks = pool.as_ref().map(|p| BlocksConfig { kind: p.kind().to_string(), location: p.location(), holder: new_holder_name() });
                let config = StoreConfig {
                    format_version: if blocks.is_some() { FORMAT_VERSION_EXTERNAL } else { FORMAT_VERSION_CONTAINERS },
                    block_size,
                    algorithm: opts.algorithm.unwrap_or_default(),
                    blocks,
                };
                if let Some(p) = &pool {
                    p.attach(&PoolSettings { block_size: config.block_size, algorithm: config.algorithm })?;
                }
                write_config(engine.as_ref(), &config)?;
                config
            }
        };

        let blocks = match pool {
            Some(p) => {
                p.attach(&PoolSettings { block_size: config.block_size, algorithm: config.algorithm })?;
                Blocks::External(p)
            }
            None => {
                let recorded = match engine.get(Cf::Meta, NEXT_CONTAINER_ID_KEY)? {
                    Some(v) => u32::from_le_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt("next container id".into()))?),
                    None => 0,
                };
                Blocks::Local(Arc::new(Containers::open(containers, config.block_size, opts.container_bytes, recorded)?))
            }
        };
        let cache_bytes = if matches!(blocks, Blocks::External(_)) { opts.cache_bytes } else { 0 };
        let refs = refs_log::RefsLog::open(engine.as_ref(), opts.map_cache_entries)?;
        let data = match &blocks {
            Blocks::Local(c) => Some(Arc::clone(c)),
            Blocks::External(_) => None,
        };
        let refs_folder = Mutex::new(Some(refs.start_folding(Arc::clone(&engine), data.clone())));
        let slot_reuse = Mutex::new(data.filter(|_| opts.reuse_dead_slots).map(|c| slot_reuse::SlotReuse::start(Arc::clone(&engine), c)));
        let store = Store {
            cache: BlockCache::new(cache_bytes, config.block_size as usize),
            block_size: config.block_size,
            algorithm: config.algorithm,
            engine,
            blocks,
            holder: config.blocks.map(|b| b.holder).unwrap_or_default(),
            verify_reads: opts.verify_reads,
            reuse_dead_slots: opts.reuse_dead_slots,
            write_threads: opts.write_threads.max(1),
            block_stripes: (0..BLOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            fingerprint_stripes: (0..FINGERPRINT_STRIPES).map(|_| Mutex::new(())).collect(),
            catalog: Mutex::new(()),
            compaction: Mutex::new(()),
            appends: RwLock::new(()),
            disks: RwLock::new(DiskTable::default()),
            refs,
            refs_folder,
            slot_reuse,
        };
        store.load_catalog()?;
        // Pool operations a crash interrupted first, so that the deletes below start from
        // references that agree with the counts.
        store.reconcile_intents()?;
        store.finish_interrupted_deletes()?;
        Ok(store)
    }

    /// Where the blocks are: "containers" (the store's own) or an external pool's location
    /// ("rados:POOL/NAMESPACE").
    pub fn block_pool(&self) -> String {
        match &self.blocks {
            Blocks::Local(_) => "containers".to_string(),
            Blocks::External(p) => p.location(),
        }
    }

    fn external_pool(&self) -> Option<&Arc<dyn BlockPool>> {
        match &self.blocks {
            Blocks::External(p) => Some(p),
            Blocks::Local(_) => None,
        }
    }

    fn containers(&self) -> Option<&Containers> {
        match &self.blocks {
            Blocks::Local(c) => Some(c.as_ref()),
            Blocks::External(_) => None,
        }
    }

    /// This store's name in its external pool (None with local blocks): the holder of its
    /// references, which other stores sharing the pool never touch.
    pub fn pool_holder(&self) -> Option<&str> {
        self.external_pool().map(|_| self.holder.as_str())
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn algorithm(&self) -> FingerprintAlgorithm {
        self.algorithm
    }

    /// The fingerprint this store gives `data`.
    pub fn fingerprint(&self, data: &[u8]) -> Fingerprint {
        self.algorithm.fingerprint(data)
    }

    /// Whether a block's bytes are all zero (such blocks are never stored).
    pub fn is_zero_block(data: &[u8]) -> bool {
        is_zero(data)
    }
}
