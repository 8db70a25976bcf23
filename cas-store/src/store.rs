//! The store: disks made of block maps over content-addressed, reference-counted blocks.
//!
//! # Concurrency
//! - A disk's *layout lock* is taken shared by every I/O and exclusively by resize and delete,
//!   so blocks are never released under a running request.
//! - *Block stripes* (reader-writer locks hashed from disk and block number) serialise the
//!   read-modify-write of one block; writes to different blocks proceed concurrently.
//! - *Fingerprint stripes* serialise reading a reference count and committing its new value, so
//!   two writers can never both decide that a block is new, or that it is dead.
//! - Locks are taken in that order (layout, blocks, fingerprints), each group in ascending
//!   index order, so there is no cycle.
//!
//! With the local pool, a map entry and the reference-count changes it causes go in one atomic
//! batch. With an external pool (blocks shared by many stores, see [`crate::pool`]) the store
//! claims new blocks in the pool before committing the batch and releases dead ones after it,
//! still under the fingerprint stripes: a crash can leak a reference, never leave a map entry
//! naming a block that is not stored. A reader that holds a block's stripe sees a map entry
//! whose block is stored: the entry itself holds a reference, and only a writer of the same
//! block (excluded by the stripe) can drop it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::cache::BlockCache;
use crate::dirty::DirtyBitmap;
use crate::engine::{prefix_end, Cf, KvEngine, MemEngine, RocksEngine, RocksTuning, WriteBatch};
use crate::keys::*;
use crate::pool::{BlockPool, Claim, Claimed, LocalPool, PoolSettings};
use crate::{Fingerprint, FingerprintAlgorithm, Result, StoreError};

/// Blocks committed per batch. Bounds lock hold times and batch sizes for large requests; a
/// request larger than this is not atomic as a whole (NBD does not ask it to be).
const CHUNK_BLOCKS: u64 = 256;
const BLOCK_STRIPES: usize = 1024;
/// Reads of more blocks than this at once bypass filling the hot-block cache.
const SCAN_BLOCKS: u64 = 32;
const FINGERPRINT_STRIPES: usize = 256;
/// Format of a store whose blocks are in its own engine.
const FORMAT_VERSION: u32 = 1;
/// Format of a store whose blocks are in an external pool: builds that predate pools refuse
/// it rather than open a store whose blocks they cannot see.
const FORMAT_VERSION_EXTERNAL: u32 = 2;
/// Fingerprints looked up in the pool per batch by fsck and repair.
const POOL_BATCH: usize = 1024;

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Block size for a new store (a power of two, 512..=65536; default 4096). When opening an
    /// existing store, `None` accepts what it was created with and `Some` must match it.
    pub block_size: Option<u32>,
    /// Fingerprint algorithm, with the same rule as `block_size` (default BLAKE3-128).
    pub algorithm: Option<FingerprintAlgorithm>,
    /// Bytes of the hot-block cache in front of the engine (0 disables it).
    pub cache_bytes: usize,
    pub rocks: RocksTuning,
    /// Where the blocks live. None: in the store's own engine (RocksDB, one machine). Some: an
    /// external pool shared with other stores (RADOS: see the `cas-rados` crate). The choice
    /// is recorded when the store is created; reopening with another pool is refused.
    pub pool: Option<Arc<dyn BlockPool>>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { block_size: None, algorithm: None, cache_bytes: 64 << 20, rocks: RocksTuning::default(), pool: None }
    }
}

/// What a store records about itself at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoreConfig {
    format_version: u32,
    block_size: u32,
    algorithm: FingerprintAlgorithm,
    /// Absent: blocks in the store's engine.
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

/// What [`Store::repair_references`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Fingerprints whose references were compared with the pool's.
    pub checked: u64,
    /// Leaked references given back to the pool.
    pub released: u64,
    /// References this store should have held and took again.
    pub reacquired: u64,
    /// Blocks this store maps that the pool no longer has (data lost; fsck lists them).
    pub lost: u64,
}

/// A disk's identity inside one store. Ids are never reused, so a stale id cannot reach a
/// disk created later under the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DiskId(pub u64);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskMeta {
    id: u64,
    size: u64,
}

/// A disk as the catalogue knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: DiskId,
    pub name: String,
    pub size: u64,
}

/// A run of a disk's address space that is either allocated or reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// False: a hole, which reads as zeros and costs nothing.
    pub allocated: bool,
}

/// Space accounting of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStats {
    pub name: String,
    pub size: u64,
    /// Bytes of blocks that are mapped (not holes).
    pub allocated_bytes: u64,
    /// Bytes of distinct blocks that no other disk and no other block of this disk shares.
    pub exclusive_bytes: u64,
    /// Bytes of mapped blocks that share their content with another block (here or elsewhere).
    pub shared_bytes: u64,
}

/// Space accounting of the whole store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    pub block_size: u32,
    pub algorithm: FingerprintAlgorithm,
    pub disks: u64,
    /// Sum of the disks' sizes.
    pub logical_bytes: u64,
    /// Bytes the disks map (logical bytes minus holes).
    pub allocated_bytes: u64,
    /// Distinct blocks stored, and their bytes before the engine's compression.
    pub stored_blocks: u64,
    pub stored_bytes: u64,
    /// allocated / stored: how many times each stored byte is used on average.
    pub dedupe_ratio: f64,
    /// What the engine occupies on disk (after compression), if it can tell.
    pub engine_bytes: Option<u64>,
}

/// What `fsck` found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FsckReport {
    pub disks: u64,
    pub map_entries: u64,
    pub stored_blocks: u64,
    pub verified_blocks: u64,
    /// Number of problems found; `problems` lists the first of them.
    pub problem_count: u64,
    pub problems: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, message: String) {
        self.problem_count += 1;
        if self.problems.len() < 100 {
            self.problems.push(message);
        }
    }
}

#[derive(Debug)]
struct DiskState {
    id: DiskId,
    size: AtomicU64,
    deleted: AtomicBool,
    /// Shared by I/O, exclusive for resize and delete.
    layout: RwLock<()>,
    dirty: Mutex<Option<DirtyBitmap>>,
}

impl DiskState {
    fn new(id: DiskId, size: u64) -> DiskState {
        DiskState { id, size: AtomicU64::new(size), deleted: AtomicBool::new(false), layout: RwLock::new(()), dirty: Mutex::new(None) }
    }
}

#[derive(Debug, Default)]
struct DiskTable {
    by_name: HashMap<String, Arc<DiskState>>,
    names: HashMap<DiskId, String>,
}

/// A block's bytes as a read gets them: from the hot-block cache, or straight from the pool.
enum BlockBytes {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BlockBytes::Shared(b) => b,
            BlockBytes::Owned(b) => b,
        }
    }
}

/// What a block becomes in a commit.
enum Target<'a> {
    Zero,
    Data {
        fp: Fingerprint,
        bytes: Cow<'a, [u8]>,
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
/// is synchronous and may block on the engine, so async callers run it on a blocking pool.
pub struct Store {
    engine: Arc<dyn KvEngine>,
    pool: Arc<dyn BlockPool>,
    /// This store's name in an external pool ("" with the local pool).
    holder: String,
    block_size: u32,
    algorithm: FingerprintAlgorithm,
    cache: BlockCache,
    block_stripes: Vec<RwLock<()>>,
    fingerprint_stripes: Vec<Mutex<()>>,
    /// Serialises catalogue changes (create, delete, rename, resize).
    catalog: Mutex<()>,
    disks: RwLock<DiskTable>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("engine", &self.engine)
            .field("pool", &self.pool.location())
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

impl Store {
    /// Opens (creating on first use) a RocksDB store in directory `path`.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|e| StoreError::Engine(format!("creating {}: {e}", path.display())))?;
        let engine = RocksEngine::open(path, &opts.rocks)?;
        Store::with_engine(Arc::new(engine), opts)
    }

    /// A store that lives in memory only (tests, other crates' tests).
    pub fn open_in_memory(opts: StoreOptions) -> Result<Store> {
        Store::with_engine(Arc::new(MemEngine::new()), opts)
    }

    /// A store on any engine.
    pub fn with_engine(engine: Arc<dyn KvEngine>, opts: StoreOptions) -> Result<Store> {
        let pool: Arc<dyn BlockPool> = match &opts.pool {
            Some(p) if p.is_external() => p.clone(),
            _ => Arc::new(LocalPool::new(engine.clone())),
        };
        let requested_blocks = if pool.is_external() { pool.location() } else { "rocksdb".to_string() };
        let config = match engine.get(Cf::Meta, CONFIG_KEY)? {
            Some(bytes) => {
                let stored: StoreConfig = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("store configuration unreadable (made by a newer or a test build?): {e}")))?;
                let expected_version = if stored.blocks.is_some() { FORMAT_VERSION_EXTERNAL } else { FORMAT_VERSION };
                if stored.format_version != expected_version {
                    return Err(StoreError::ConfigMismatch {
                        setting: "format version",
                        stored: stored.format_version.to_string(),
                        requested: expected_version.to_string(),
                    });
                }
                let stored_blocks = stored.blocks.as_ref().map_or("rocksdb", |b| b.location.as_str());
                let same_pool = match &stored.blocks {
                    None => !pool.is_external(),
                    Some(b) => pool.is_external() && b.kind == pool.kind() && b.location == pool.location(),
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
                let blocks = pool.is_external().then(|| BlocksConfig { kind: pool.kind().to_string(), location: pool.location(), holder: new_holder_name() });
                let config = StoreConfig {
                    format_version: if blocks.is_some() { FORMAT_VERSION_EXTERNAL } else { FORMAT_VERSION },
                    block_size,
                    algorithm: opts.algorithm.unwrap_or_default(),
                    blocks,
                };
                pool.attach(&PoolSettings { block_size: config.block_size, algorithm: config.algorithm })?;
                let mut batch = WriteBatch::new();
                batch.put(Cf::Meta, CONFIG_KEY, serde_json::to_vec(&config).expect("serialisable"));
                engine.write(batch)?;
                engine.sync()?;
                config
            }
        };

        pool.attach(&PoolSettings { block_size: config.block_size, algorithm: config.algorithm })?;
        let store = Store {
            cache: BlockCache::new(opts.cache_bytes, config.block_size as usize),
            block_size: config.block_size,
            algorithm: config.algorithm,
            engine,
            pool,
            holder: config.blocks.map(|b| b.holder).unwrap_or_default(),
            block_stripes: (0..BLOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            fingerprint_stripes: (0..FINGERPRINT_STRIPES).map(|_| Mutex::new(())).collect(),
            catalog: Mutex::new(()),
            disks: RwLock::new(DiskTable::default()),
        };
        store.load_catalog()?;
        // Pool operations a crash interrupted first, so that the deletes below start from
        // references that agree with the counts.
        store.reconcile_intents()?;
        store.finish_interrupted_deletes()?;
        Ok(store)
    }

    /// Where the blocks are: "rocksdb" (the store's own engine) or an external pool's location
    /// ("rados:POOL/NAMESPACE").
    pub fn block_pool(&self) -> String {
        if self.pool.is_external() {
            self.pool.location()
        } else {
            "rocksdb".to_string()
        }
    }

    /// This store's name in its external pool (None with the local pool): the holder of its
    /// references, which other stores sharing the pool never touch.
    pub fn pool_holder(&self) -> Option<&str> {
        self.pool.is_external().then_some(self.holder.as_str())
    }

    fn load_catalog(&self) -> Result<()> {
        let mut table = self.disks.write();
        for kv in self.engine.scan(Cf::Disks, b"", None)? {
            let (key, value) = kv?;
            let name = String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt("disk name is not UTF-8".into()))?;
            let meta: DiskMeta = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt(format!("metadata of disk {name:?}: {e}")))?;
            let state = Arc::new(DiskState::new(DiskId(meta.id), meta.size));
            table.names.insert(state.id, name.clone());
            table.by_name.insert(name, state);
        }
        Ok(())
    }

    /// A delete that was interrupted by a crash left a marker; release the rest of its blocks.
    fn finish_interrupted_deletes(&self) -> Result<()> {
        let pending: Vec<DiskId> = self
            .engine
            .scan(Cf::Meta, DELETING_PREFIX, prefix_end(DELETING_PREFIX).as_deref())?
            .map(|kv| {
                let (key, _) = kv?;
                let id = key
                    .get(DELETING_PREFIX.len()..)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .ok_or_else(|| StoreError::Corrupt("bad deletion marker".into()))?;
                Ok(DiskId(u64::from_be_bytes(id)))
            })
            .collect::<Result<_>>()?;
        for id in pending {
            tracing::info!(disk = id.0, "finishing a disk deletion interrupted by a restart");
            let state = DiskState::new(id, 0);
            self.release_blocks_from(&state, 0)?;
            let mut batch = WriteBatch::new();
            batch.delete(Cf::Meta, deleting_key(id));
            self.engine.write(batch)?;
        }
        Ok(())
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

    // ----- catalogue -------------------------------------------------------------------------

    fn validate_name(name: &str) -> Result<()> {
        let ok = !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@+".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(StoreError::InvalidArgument(format!("disk name {name:?}: use 1 to 255 characters from A-Z a-z 0-9 - _ . : @ +")))
        }
    }

    fn validate_size(size: u64) -> Result<()> {
        // NBD clients expect sizes in whole sectors; the map key space allows far more.
        if size % 512 != 0 {
            return Err(StoreError::InvalidArgument(format!("size {size} is not a multiple of 512")));
        }
        if size > 1 << 60 {
            return Err(StoreError::InvalidArgument(format!("size {size} is larger than 1 EiB")));
        }
        Ok(())
    }

    pub fn create_disk(&self, name: &str, size: u64) -> Result<DiskInfo> {
        Self::validate_name(name)?;
        Self::validate_size(size)?;
        let _catalog = self.catalog.lock();
        if self.disks.read().by_name.contains_key(name) {
            return Err(StoreError::DiskExists(name.to_string()));
        }
        let next = match self.engine.get(Cf::Meta, NEXT_DISK_ID_KEY)? {
            Some(v) => parse_count(&v)?,
            None => 1,
        };
        let id = DiskId(next);
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, NEXT_DISK_ID_KEY, encode_count(next + 1));
        batch.put(Cf::Disks, name.as_bytes(), serde_json::to_vec(&DiskMeta { id: id.0, size }).expect("json"));
        self.engine.write(batch)?;
        let mut table = self.disks.write();
        table.names.insert(id, name.to_string());
        table.by_name.insert(name.to_string(), Arc::new(DiskState::new(id, size)));
        Ok(DiskInfo { id, name: name.to_string(), size })
    }

    pub fn disk(&self, name: &str) -> Result<DiskInfo> {
        let table = self.disks.read();
        let state = table.by_name.get(name).ok_or_else(|| StoreError::DiskNotFound(name.to_string()))?;
        Ok(DiskInfo { id: state.id, name: name.to_string(), size: state.size.load(Ordering::Acquire) })
    }

    /// All disks, sorted by name.
    pub fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        let table = self.disks.read();
        let mut disks: Vec<DiskInfo> =
            table.by_name.iter().map(|(name, s)| DiskInfo { id: s.id, name: name.clone(), size: s.size.load(Ordering::Acquire) }).collect();
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(disks)
    }

    fn state(&self, disk: DiskId) -> Result<Arc<DiskState>> {
        let table = self.disks.read();
        table.names.get(&disk).and_then(|name| table.by_name.get(name)).cloned().ok_or_else(|| StoreError::DiskNotFound(format!("#{}", disk.0)))
    }

    pub fn disk_size(&self, disk: DiskId) -> Result<u64> {
        Ok(self.state(disk)?.size.load(Ordering::Acquire))
    }

    /// Deletes a disk and releases its references; blocks no other disk uses are deleted.
    /// Crash-safe: an interrupted delete is finished at the next open.
    pub fn delete_disk(&self, name: &str) -> Result<()> {
        let _catalog = self.catalog.lock();
        let state = self.disks.read().by_name.get(name).cloned().ok_or_else(|| StoreError::DiskNotFound(name.to_string()))?;
        let mut batch = WriteBatch::new();
        batch.delete(Cf::Disks, name.as_bytes());
        batch.put(Cf::Meta, deleting_key(state.id), Vec::new());
        self.engine.write(batch)?;
        {
            let mut table = self.disks.write();
            table.by_name.remove(name);
            table.names.remove(&state.id);
        }
        state.deleted.store(true, Ordering::Release);
        // Wait for requests already inside the disk, then release its blocks.
        let _layout = state.layout.write();
        self.release_blocks_from(&state, 0)?;
        let mut batch = WriteBatch::new();
        batch.delete(Cf::Meta, deleting_key(state.id));
        self.engine.write(batch)?;
        Ok(())
    }

    pub fn rename_disk(&self, from: &str, to: &str) -> Result<()> {
        Self::validate_name(to)?;
        let _catalog = self.catalog.lock();
        let state = self.disks.read().by_name.get(from).cloned().ok_or_else(|| StoreError::DiskNotFound(from.to_string()))?;
        if from == to {
            return Ok(());
        }
        if self.disks.read().by_name.contains_key(to) {
            return Err(StoreError::DiskExists(to.to_string()));
        }
        let meta = DiskMeta { id: state.id.0, size: state.size.load(Ordering::Acquire) };
        let mut batch = WriteBatch::new();
        batch.delete(Cf::Disks, from.as_bytes());
        batch.put(Cf::Disks, to.as_bytes(), serde_json::to_vec(&meta).expect("json"));
        self.engine.write(batch)?;
        let mut table = self.disks.write();
        table.by_name.remove(from);
        table.by_name.insert(to.to_string(), state.clone());
        table.names.insert(state.id, to.to_string());
        Ok(())
    }

    /// Grows or shrinks a disk. Shrinking releases the blocks past the new end and zeroes the
    /// tail of a last, partial block, so growing again reads zeros there.
    pub fn resize_disk(&self, name: &str, size: u64) -> Result<DiskInfo> {
        Self::validate_size(size)?;
        let _catalog = self.catalog.lock();
        let state = self.disks.read().by_name.get(name).cloned().ok_or_else(|| StoreError::DiskNotFound(name.to_string()))?;
        let _layout = state.layout.write();
        let old = state.size.load(Ordering::Acquire);
        if size < old {
            let bs = u64::from(self.block_size);
            let keep_blocks = size.div_ceil(bs);
            self.release_blocks_from(&state, keep_blocks)?;
            let tail_end = old.min(keep_blocks * bs);
            if tail_end > size {
                self.update_range(&state, size, tail_end - size, Source::Zeroes)?;
            }
        }
        let mut batch = WriteBatch::new();
        batch.put(Cf::Disks, name.as_bytes(), serde_json::to_vec(&DiskMeta { id: state.id.0, size }).expect("json"));
        self.engine.write(batch)?;
        state.size.store(size, Ordering::Release);
        if let Some(d) = state.dirty.lock().as_mut() {
            d.grow(size.div_ceil(u64::from(self.block_size)));
        }
        Ok(DiskInfo { id: state.id, name: name.to_string(), size })
    }

    /// Releases every map entry of `state` at block `from` or later, in bounded batches.
    fn release_blocks_from(&self, state: &DiskState, from: u64) -> Result<()> {
        let end = map_key(DiskId(state.id.0), u64::MAX);
        let mut from = from;
        loop {
            let entries: Vec<(u64, Fingerprint)> = self
                .engine
                .scan(Cf::Maps, &map_key(state.id, from), Some(&end))?
                .take(CHUNK_BLOCKS as usize * 4)
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((parse_map_key(&k)?.1, parse_fingerprint(&v)?))
                })
                .collect::<Result<_>>()?;
            // The all-ones block number is outside every disk (sizes are at most 1 EiB).
            if entries.is_empty() {
                return Ok(());
            }
            // The next scan starts past this chunk: starting again at `from` would walk over
            // the tombstones of every chunk before it (quadratic on a large disk).
            from = entries.last().map_or(from, |e| e.0 + 1);
            let old: Vec<Option<Fingerprint>> = entries.iter().map(|e| Some(e.1)).collect();
            let updates = entries.iter().map(|e| (e.0, Target::Zero)).collect();
            self.commit(state, updates, &old)?;
        }
    }

    // ----- I/O -------------------------------------------------------------------------------

    fn io_state(&self, disk: DiskId) -> Result<Arc<DiskState>> {
        let state = self.state(disk)?;
        Ok(state)
    }

    fn check_range(state: &DiskState, offset: u64, length: u64) -> Result<()> {
        let size = state.size.load(Ordering::Acquire);
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, length, size)),
        }
    }

    fn block_stripe(&self, disk: DiskId, block: u64) -> usize {
        // Consecutive blocks land on consecutive stripes, so one chunk never locks a stripe twice.
        (disk.0.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(block) % BLOCK_STRIPES as u64) as usize
    }

    fn stripe_indices(&self, disk: DiskId, first: u64, last: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (first..=last).map(|b| self.block_stripe(disk, b)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx
    }

    /// Reads `buf.len()` bytes at `offset`. Any range inside the disk, aligned or not.
    pub fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let state = self.io_state(disk)?;
        let _layout = state.layout.read();
        if state.deleted.load(Ordering::Acquire) {
            return Err(StoreError::DiskNotFound(format!("#{}", disk.0)));
        }
        Self::check_range(&state, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.block_size);
        let end = offset + buf.len() as u64;
        let mut first = offset / bs;
        let last = (end - 1) / bs;
        while first <= last {
            let chunk_last = last.min(first + CHUNK_BLOCKS - 1);
            let stripes = self.stripe_indices(disk, first, chunk_last);
            let _guards: Vec<_> = stripes.iter().map(|&i| self.block_stripes[i].read()).collect();
            let fps = self.map_lookup(disk, first, chunk_last)?;
            // A large read is a scan (a copy, a backup, a sequential reader): it consults the
            // hot-block cache but does not fill it, so it neither evicts the hot set nor pays
            // for an extra copy of every block.
            let fill_cache = chunk_last - first < SCAN_BLOCKS;
            let datas = self.read_blocks(&fps, fill_cache)?;
            for (i, data) in datas.iter().enumerate() {
                let block = first + i as u64;
                let block_start = block * bs;
                let from = offset.max(block_start);
                let to = end.min(block_start + bs);
                let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                match data {
                    Some(d) => dst.copy_from_slice(&d[(from - block_start) as usize..(to - block_start) as usize]),
                    None => dst.fill(0),
                }
            }
            first = chunk_last + 1;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. With `fua`, the data is durable when this returns.
    pub fn write(&self, disk: DiskId, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.update(disk, offset, data.len() as u64, Source::Data(data), fua)
    }

    /// Makes a range read as zeros; whole blocks inside it are released, not stored.
    pub fn write_zeroes(&self, disk: DiskId, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.update(disk, offset, len, Source::Zeroes, fua)
    }

    /// Discards a range. In this store a discarded range reads as zeros, like `write_zeroes`.
    pub fn trim(&self, disk: DiskId, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.update(disk, offset, len, Source::Zeroes, fua)
    }

    /// Makes every write that has returned durable.
    pub fn flush(&self) -> Result<()> {
        self.engine.sync()
    }

    fn update(&self, disk: DiskId, offset: u64, len: u64, source: Source<'_>, fua: bool) -> Result<()> {
        let state = self.io_state(disk)?;
        {
            let _layout = state.layout.read();
            if state.deleted.load(Ordering::Acquire) {
                return Err(StoreError::DiskNotFound(format!("#{}", disk.0)));
            }
            Self::check_range(&state, offset, len)?;
            self.update_range(&state, offset, len, source)?;
        }
        if fua {
            // Outside every lock: a sync covers this write and any other already applied.
            self.engine.sync()?;
        }
        Ok(())
    }

    /// Applies a range update; the caller holds the disk's layout lock (either way).
    fn update_range(&self, state: &DiskState, offset: u64, len: u64, source: Source<'_>) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let mut first = offset / bs;
        let last = (end - 1) / bs;
        while first <= last {
            let chunk_last = last.min(first + CHUNK_BLOCKS - 1);
            // Whole blocks are hashed before any lock is taken.
            let mut full: Vec<Option<Target<'_>>> = Vec::with_capacity((chunk_last - first + 1) as usize);
            for block in first..=chunk_last {
                let start = block * bs;
                let covered = offset <= start && start + bs <= end;
                full.push(covered.then(|| match source {
                    Source::Zeroes => Target::Zero,
                    Source::Data(d) => {
                        let bytes = &d[(start - offset) as usize..(start - offset + bs) as usize];
                        self.target_for(Cow::Borrowed(bytes))
                    }
                }));
            }
            let stripes = self.stripe_indices(state.id, first, chunk_last);
            let _guards: Vec<_> = stripes.iter().map(|&i| self.block_stripes[i].write()).collect();
            let old = self.map_lookup(state.id, first, chunk_last)?;
            let mut updates = Vec::with_capacity(full.len());
            for (i, target) in full.into_iter().enumerate() {
                let block = first + i as u64;
                let target = match target {
                    Some(t) => t,
                    None => {
                        // A partial block: read, modify, write, under the block's stripe.
                        let start = block * bs;
                        let mut bytes = match old[i] {
                            Some(fp) => self.load_block(&fp)?.to_vec(),
                            None => vec![0u8; bs as usize],
                        };
                        let from = offset.max(start);
                        let to = end.min(start + bs);
                        let dst = &mut bytes[(from - start) as usize..(to - start) as usize];
                        match source {
                            Source::Zeroes => dst.fill(0),
                            Source::Data(d) => dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize]),
                        }
                        self.target_for(Cow::Owned(bytes))
                    }
                };
                updates.push((block, target));
            }
            self.commit(state, updates, &old)?;
            first = chunk_last + 1;
        }
        Ok(())
    }

    fn target_for<'a>(&self, bytes: Cow<'a, [u8]>) -> Target<'a> {
        if is_zero(&bytes) {
            Target::Zero
        } else {
            Target::Data { fp: self.algorithm.fingerprint(&bytes), bytes }
        }
    }

    /// Net reference change per fingerprint of the given (target, old fingerprint) pairs, and
    /// the bytes of fingerprints that may be new. Err: two different blocks of one request
    /// share a fingerprint.
    #[allow(clippy::type_complexity)]
    fn plan<'u, 'a: 'u>(
        entries: impl Iterator<Item = (&'u Target<'a>, &'u Option<Fingerprint>)>,
    ) -> std::result::Result<BTreeMap<Fingerprint, (i64, Option<&'u [u8]>)>, Fingerprint> {
        let mut deltas: BTreeMap<Fingerprint, (i64, Option<&'u [u8]>)> = BTreeMap::new();
        for (target, old_fp) in entries {
            let new_fp = match target {
                Target::Zero => None,
                Target::Data { fp, .. } | Target::Existing(fp) => Some(*fp),
            };
            if new_fp == *old_fp {
                continue;
            }
            if let Some(fp) = old_fp {
                deltas.entry(*fp).or_insert((0, None)).0 -= 1;
            }
            match target {
                Target::Zero => {}
                Target::Existing(fp) => deltas.entry(*fp).or_insert((0, None)).0 += 1,
                Target::Data { fp, bytes } => {
                    let entry = deltas.entry(*fp).or_insert((0, None));
                    entry.0 += 1;
                    match entry.1 {
                        None => entry.1 = Some(&bytes[..]),
                        Some(seen) if seen != &bytes[..] => return Err(*fp),
                        Some(_) => {}
                    }
                }
            }
        }
        Ok(deltas)
    }

    /// Commits new contents of blocks whose current fingerprints are `old` (same order), with
    /// their reference-count changes. The caller holds the blocks' stripes. Returns, per
    /// update, whether it was applied (an `Existing` target that is not stored is not).
    ///
    /// Local pool: one batch holds the map changes, the counts, and the blocks stored and
    /// deleted. External pool: intents are recorded, new blocks are claimed in the pool, the
    /// batch (maps, counts, intents of the releases to come) is committed, then blocks whose
    /// count reached zero are released and their intents cleared; all under the fingerprint
    /// stripes, so no other writer of this store claims or releases the same block meanwhile.
    fn commit(&self, state: &DiskState, updates: Vec<(u64, Target<'_>)>, old: &[Option<Fingerprint>]) -> Result<Vec<bool>> {
        let first_plan = Self::plan(updates.iter().map(|(_, t)| t).zip(old)).map_err(|fp| self.collision(fp))?;
        if first_plan.is_empty() {
            return Ok(vec![true; updates.len()]);
        }

        let mut fp_stripes: Vec<usize> = first_plan.keys().map(|fp| self.fingerprint_stripe(fp)).collect();
        fp_stripes.sort_unstable();
        fp_stripes.dedup();
        let _fp_guards: Vec<_> = fp_stripes.iter().map(|&i| self.fingerprint_stripes[i].lock()).collect();

        let fps: Vec<Fingerprint> = first_plan.keys().copied().collect();
        let counts: HashMap<Fingerprint, u64> = fps.iter().copied().zip(self.ref_counts(&fps)?).collect();

        // A fingerprint this store holds already: compare bytes before sharing the block.
        let to_verify: Vec<(Fingerprint, &[u8])> = first_plan
            .iter()
            .filter_map(|(fp, (_, bytes))| match bytes {
                Some(bytes) if counts[fp] > 0 => Some((*fp, *bytes)),
                _ => None,
            })
            .collect();
        if !to_verify.is_empty() {
            let stored = self.load_blocks(&to_verify.iter().map(|(fp, _)| Some(*fp)).collect::<Vec<_>>())?;
            for ((fp, bytes), stored) in to_verify.iter().zip(stored) {
                if stored.as_deref() != Some(*bytes) {
                    return Err(self.collision(*fp));
                }
            }
        }

        // Blocks new to this store: claim them in the pool.
        let claims: Vec<(Fingerprint, Claim<'_>)> = first_plan
            .iter()
            .filter(|(fp, (delta, _))| counts[*fp] == 0 && *delta > 0)
            .map(|(fp, (_, bytes))| (*fp, bytes.map_or(Claim::Existing, Claim::Data)))
            .collect();
        let external = self.pool.is_external();
        let mut batch = WriteBatch::new();
        if external && !claims.is_empty() {
            let mut intents = WriteBatch::new();
            for (fp, _) in &claims {
                intents.put(Cf::Meta, pending_key(fp), Vec::new());
            }
            self.engine.write(intents)?;
        }
        let claimed = if claims.is_empty() { Vec::new() } else { self.pool.acquire(&self.holder, &claims, &mut batch)? };
        let mut taken: Vec<Fingerprint> = Vec::new();
        let mut missing: HashSet<Fingerprint> = HashSet::new();
        let mut collided = None;
        for ((fp, _), outcome) in claims.iter().zip(&claimed) {
            match outcome {
                Claimed::Yes => taken.push(*fp),
                Claimed::Missing => {
                    missing.insert(*fp);
                }
                Claimed::Collision => collided = Some(*fp),
            }
        }
        let claim_fps: Vec<Fingerprint> = claims.iter().map(|(fp, _)| *fp).collect();
        if let Some(fp) = collided {
            self.give_back(&taken, &claim_fps);
            return Err(self.collision(fp));
        }

        // `Existing` targets whose block is not stored are skipped: plan again without them.
        // Removing them only removes increments of the missing fingerprints and decrements of
        // the skipped blocks' old ones, so the claims taken stay needed.
        let applied: Vec<bool> = updates.iter().map(|(_, t)| !matches!(t, Target::Existing(fp) if missing.contains(fp))).collect();
        let deltas = if missing.is_empty() {
            first_plan
        } else {
            Self::plan(updates.iter().zip(old).zip(&applied).filter(|(_, &a)| a).map(|(((_, t), o), _)| (t, o))).map_err(|fp| self.collision(fp))?
        };

        let mut releases: Vec<Fingerprint> = Vec::new();
        for (fp, (delta, _)) in &deltas {
            let count = counts[fp];
            let new = i128::from(count) + i128::from(*delta);
            if new < 0 {
                self.give_back(&taken, &claim_fps);
                return Err(StoreError::Corrupt(format!("reference count of {fp} would fall below zero")));
            }
            let new = new as u64;
            if new == count {
                continue;
            }
            if new == 0 {
                batch.delete(Cf::Refs, fp.0);
                releases.push(*fp);
            } else {
                batch.put(Cf::Refs, fp.0, encode_count(new));
            }
        }
        if external {
            for fp in &claim_fps {
                batch.delete(Cf::Meta, pending_key(fp));
            }
            for fp in &releases {
                batch.put(Cf::Meta, pending_key(fp), Vec::new());
            }
        } else if !releases.is_empty() {
            self.pool.release(&self.holder, &releases, &mut batch)?;
        }

        let mut changed = Vec::new();
        for (((block, target), old_fp), _) in updates.iter().zip(old).zip(&applied).filter(|(_, &a)| a) {
            let new_fp = match target {
                Target::Zero => None,
                Target::Data { fp, .. } | Target::Existing(fp) => Some(*fp),
            };
            if new_fp == *old_fp {
                continue;
            }
            let key = map_key(state.id, *block);
            match new_fp {
                Some(fp) => batch.put(Cf::Maps, key, fp.0),
                None => batch.delete(Cf::Maps, key),
            }
            changed.push(*block);
        }
        if batch.is_empty() {
            return Ok(applied);
        }
        if let Err(e) = self.engine.write(batch) {
            self.give_back(&taken, &claim_fps);
            return Err(e);
        }
        if external {
            // New blocks are likely read soon (a guest reads what it wrote); fetching them back
            // from the pool would cost a round trip.
            for fp in &taken {
                if let Some(bytes) = deltas.get(fp).and_then(|(_, b)| *b) {
                    self.cache.insert(*fp, Arc::from(bytes));
                }
            }
            if !releases.is_empty() {
                match self.pool.release(&self.holder, &releases, &mut WriteBatch::new()) {
                    Ok(()) => self.clear_intents(&releases),
                    Err(e) => tracing::warn!(
                        error = %e,
                        blocks = releases.len(),
                        "releasing references in the block pool failed; they stay recorded and the next open or repair gives them back"
                    ),
                }
            }
        }
        for fp in &releases {
            self.cache.remove(fp);
        }
        if !changed.is_empty() {
            if let Some(dirty) = state.dirty.lock().as_mut() {
                for block in changed {
                    dirty.set(block);
                }
            }
        }
        Ok(applied)
    }

    /// After a failed commit on an external pool: gives back the references this commit took
    /// and clears the intents of its claims. What cannot be given back stays recorded.
    fn give_back(&self, taken: &[Fingerprint], claimed: &[Fingerprint]) {
        if !self.pool.is_external() || claimed.is_empty() {
            return;
        }
        let released = taken.is_empty() || self.pool.release(&self.holder, taken, &mut WriteBatch::new()).is_ok();
        if released {
            self.clear_intents(claimed);
        } else {
            tracing::warn!(blocks = taken.len(), "could not give back references after a failed write; the next open or repair does");
        }
    }

    fn clear_intents(&self, fps: &[Fingerprint]) {
        let mut batch = WriteBatch::new();
        for fp in fps {
            batch.delete(Cf::Meta, pending_key(fp));
        }
        if let Err(e) = self.engine.write(batch) {
            tracing::warn!(error = %e, "clearing block pool intents failed; the next open reconciles them");
        }
    }

    /// Fingerprints with a recorded intent (an external pool operation that may not have
    /// completed).
    fn pending_intents(&self) -> Result<Vec<Fingerprint>> {
        self.engine
            .scan(Cf::Meta, PENDING_PREFIX, prefix_end(PENDING_PREFIX).as_deref())?
            .map(|kv| {
                let (key, _) = kv?;
                key.get(PENDING_PREFIX.len()..).and_then(Fingerprint::from_slice).ok_or_else(|| StoreError::Corrupt("bad block pool intent".into()))
            })
            .collect()
    }

    /// Reconciles the intents left by a crash (at open).
    fn reconcile_intents(&self) -> Result<()> {
        if !self.pool.is_external() {
            return Ok(());
        }
        let pending = self.pending_intents()?;
        if pending.is_empty() {
            return Ok(());
        }
        let report = self.reconcile(&pending)?;
        tracing::info!(?report, "reconciled block pool references an interruption left behind");
        Ok(())
    }

    /// Brings this store's references in the pool in line with its counts for `fps`: one
    /// reference on each block it maps, none on the others. Clears their intents.
    fn reconcile(&self, fps: &[Fingerprint]) -> Result<RepairReport> {
        let mut report = RepairReport::default();
        let mut fps = fps.to_vec();
        fps.sort_unstable();
        fps.dedup();
        for chunk in fps.chunks(POOL_BATCH) {
            let mut stripes: Vec<usize> = chunk.iter().map(|fp| self.fingerprint_stripe(fp)).collect();
            stripes.sort_unstable();
            stripes.dedup();
            let _guards: Vec<_> = stripes.iter().map(|&i| self.fingerprint_stripes[i].lock()).collect();
            let counts = self.ref_counts(chunk)?;
            let have = self.pool.holder_refs(&self.holder, chunk)?;
            let mut extra: Vec<Fingerprint> = Vec::new();
            let mut retake: Vec<(Fingerprint, Claim<'_>)> = Vec::new();
            for ((fp, &count), have) in chunk.iter().zip(&counts).zip(&have) {
                report.checked += 1;
                let want = u64::from(count > 0);
                match *have {
                    None if want > 0 => {
                        tracing::error!(fingerprint = %fp, "a block this store maps is missing from the pool");
                        report.lost += 1;
                    }
                    None => {}
                    Some(h) if h > want => extra.extend(std::iter::repeat_n(*fp, (h - want) as usize)),
                    Some(h) if h < want => retake.push((*fp, Claim::Existing)),
                    Some(_) => {}
                }
            }
            if !extra.is_empty() {
                self.pool.release(&self.holder, &extra, &mut WriteBatch::new())?;
                report.released += extra.len() as u64;
            }
            if !retake.is_empty() {
                for outcome in self.pool.acquire(&self.holder, &retake, &mut WriteBatch::new())? {
                    match outcome {
                        Claimed::Yes => report.reacquired += 1,
                        _ => report.lost += 1,
                    }
                }
            }
            let mut batch = WriteBatch::new();
            for fp in chunk {
                batch.delete(Cf::Meta, pending_key(fp));
            }
            self.engine.write(batch)?;
        }
        Ok(report)
    }

    /// Makes this store's references in an external pool agree with its block maps: finishes
    /// operations a crash or a lost connection interrupted (recorded as intents), and with
    /// `scan_pool` also lists the whole pool to find references leaked in ways no intent
    /// recorded (a reply lost after the pool applied it). Nothing to do with the local pool.
    /// Safe while the store serves I/O.
    pub fn repair_references(&self, scan_pool: bool) -> Result<RepairReport> {
        if !self.pool.is_external() {
            return Ok(RepairReport::default());
        }
        let mut candidates = self.pending_intents()?;
        if scan_pool {
            for block in self.pool.scan(&self.holder)? {
                let block = block?;
                if block.holder_refs > 0 {
                    candidates.push(block.fingerprint);
                }
            }
            for kv in self.engine.scan(Cf::Refs, b"", None)? {
                candidates.push(parse_fingerprint(&kv?.0)?);
            }
        }
        self.reconcile(&candidates)
    }

    fn collision(&self, fp: Fingerprint) -> StoreError {
        tracing::error!(fingerprint = %fp, algorithm = %self.algorithm, "fingerprint collision: two different blocks share a fingerprint; write refused");
        StoreError::Collision(fp)
    }

    fn fingerprint_stripe(&self, fp: &Fingerprint) -> usize {
        usize::from(u16::from_le_bytes([fp.0[0], fp.0[1]])) % FINGERPRINT_STRIPES
    }

    fn ref_counts(&self, fps: &[Fingerprint]) -> Result<Vec<u64>> {
        let keys: Vec<&[u8]> = fps.iter().map(|fp| &fp.0[..]).collect();
        self.engine.multi_get(Cf::Refs, &keys)?.into_iter().map(|v| v.map_or(Ok(0), |v| parse_count(&v))).collect()
    }

    /// The fingerprints mapped at blocks `first..=last` of a disk (None: a hole).
    fn map_lookup(&self, disk: DiskId, first: u64, last: u64) -> Result<Vec<Option<Fingerprint>>> {
        let keys: Vec<[u8; 16]> = (first..=last).map(|b| map_key(disk, b)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        self.engine.multi_get(Cf::Maps, &refs)?.into_iter().map(|v| v.map(|v| parse_fingerprint(&v)).transpose()).collect()
    }

    fn load_block(&self, fp: &Fingerprint) -> Result<Arc<[u8]>> {
        self.load_blocks(&[Some(*fp)])?.pop().flatten().ok_or_else(|| self.missing_block(fp))
    }

    fn missing_block(&self, fp: &Fingerprint) -> StoreError {
        StoreError::Corrupt(format!("block {fp} is mapped but not stored"))
    }

    /// Loads the blocks of `fps` (None stays None), from the cache or the pool in one batch; a
    /// block that is not stored is an error (it is mapped).
    fn load_blocks(&self, fps: &[Option<Fingerprint>]) -> Result<Vec<Option<Arc<[u8]>>>> {
        let fetched = self.fetch_blocks(fps)?;
        for (fp, data) in fps.iter().zip(&fetched) {
            if let (Some(fp), None) = (fp, data) {
                return Err(self.missing_block(fp));
            }
        }
        Ok(fetched)
    }

    /// Like `load_blocks`, for reads: without `fill_cache`, blocks that miss the cache are
    /// returned as read and not cached.
    fn read_blocks(&self, fps: &[Option<Fingerprint>], fill_cache: bool) -> Result<Vec<Option<BlockBytes>>> {
        if fill_cache {
            return Ok(self.load_blocks(fps)?.into_iter().map(|b| b.map(BlockBytes::Shared)).collect());
        }
        let mut out: Vec<Option<BlockBytes>> = Vec::with_capacity(fps.len());
        let mut misses: Vec<(usize, Fingerprint)> = Vec::new();
        for (i, fp) in fps.iter().enumerate() {
            out.push(None);
            if let Some(fp) = fp {
                match self.cache.get(fp) {
                    Some(d) => out[i] = Some(BlockBytes::Shared(d)),
                    None => misses.push((i, *fp)),
                }
            }
        }
        if misses.is_empty() {
            return Ok(out);
        }
        let wanted: Vec<Fingerprint> = misses.iter().map(|(_, fp)| *fp).collect();
        for ((i, fp), value) in misses.into_iter().zip(self.pool.get_many(&wanted)?) {
            let value = value.ok_or_else(|| self.missing_block(&fp))?;
            if value.len() != self.block_size as usize {
                return Err(StoreError::Corrupt(format!("block {fp} has {} bytes", value.len())));
            }
            out[i] = Some(BlockBytes::Owned(value));
        }
        Ok(out)
    }

    /// Like `load_blocks`, but a block that is not stored reads as None.
    fn fetch_blocks(&self, fps: &[Option<Fingerprint>]) -> Result<Vec<Option<Arc<[u8]>>>> {
        let mut out: Vec<Option<Arc<[u8]>>> = Vec::with_capacity(fps.len());
        let mut misses: Vec<(usize, Fingerprint)> = Vec::new();
        for (i, fp) in fps.iter().enumerate() {
            match fp {
                None => out.push(None),
                Some(fp) => match self.cache.get(fp) {
                    Some(d) => out.push(Some(d)),
                    None => {
                        out.push(None);
                        misses.push((i, *fp));
                    }
                },
            }
        }
        if misses.is_empty() {
            return Ok(out);
        }
        let wanted: Vec<Fingerprint> = misses.iter().map(|(_, fp)| *fp).collect();
        let values = self.pool.get_many(&wanted)?;
        for ((i, fp), value) in misses.into_iter().zip(values) {
            let Some(value) = value else { continue };
            let data: Arc<[u8]> = value.into();
            if data.len() != self.block_size as usize {
                return Err(StoreError::Corrupt(format!("block {fp} has {} bytes", data.len())));
            }
            self.cache.insert(fp, data.clone());
            out[i] = Some(data);
        }
        Ok(out)
    }

    /// Allocated and zero runs of `[offset, offset + len)`, at block granularity, clipped to
    /// the range. Consecutive runs alternate.
    pub fn block_status(&self, disk: DiskId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let state = self.io_state(disk)?;
        let _layout = state.layout.read();
        Self::check_range(&state, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |from: u64, to: u64, allocated: bool| {
            if from >= to {
                return;
            }
            match extents.last_mut() {
                Some(e) if e.allocated == allocated && e.offset + e.length == from => e.length += to - from,
                _ => extents.push(Extent { offset: from, length: to - from, allocated }),
            }
        };
        let mut cursor = offset;
        let scan = self.engine.scan(Cf::Maps, &map_key(disk, first), Some(&map_key(disk, last + 1)))?;
        for kv in scan {
            let (key, _) = kv?;
            let (_, block) = parse_map_key(&key)?;
            let from = (block * bs).max(offset);
            let to = ((block + 1) * bs).min(end);
            push(cursor, from, false);
            push(from, to, true);
            cursor = to;
        }
        push(cursor, end, false);
        Ok(extents)
    }

    // ----- block-level access (migration) ------------------------------------------------------

    /// For each fingerprint, whether the store holds its block (one batched lookup). With an
    /// external pool: whether the pool holds it, whichever store wrote it, so a migration into
    /// any server of a datacentre finds the blocks of every server sharing its pool.
    pub fn has_many(&self, fps: &[Fingerprint]) -> Result<Vec<bool>> {
        self.pool.has_many(fps)
    }

    /// A stored block's bytes.
    pub fn get_block(&self, fp: &Fingerprint) -> Result<Option<Arc<[u8]>>> {
        Ok(self.fetch_blocks(&[Some(*fp)])?.pop().flatten())
    }

    /// Stored blocks' bytes (None: not stored), in one batched lookup.
    pub fn get_blocks(&self, fps: &[Fingerprint]) -> Result<Vec<Option<Arc<[u8]>>>> {
        self.fetch_blocks(&fps.iter().map(|fp| Some(*fp)).collect::<Vec<_>>())
    }

    /// The fingerprints mapped at the given blocks of a disk (None: a hole).
    pub fn block_fingerprints(&self, disk: DiskId, blocks: &[u64]) -> Result<Vec<Option<Fingerprint>>> {
        let keys: Vec<[u8; 16]> = blocks.iter().map(|&b| map_key(disk, b)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        self.engine.multi_get(Cf::Maps, &refs)?.into_iter().map(|v| v.map(|v| parse_fingerprint(&v)).transpose()).collect()
    }

    /// Maps blocks of a disk to blocks the store already holds (no data moves: a neighbour
    /// has them). Returns, per entry, whether it was mapped; an entry whose fingerprint is not
    /// stored is left alone.
    pub fn map_existing(&self, disk: DiskId, entries: &[(u64, Fingerprint)]) -> Result<Vec<bool>> {
        let state = self.io_state(disk)?;
        let _layout = state.layout.read();
        let blocks = state.size.load(Ordering::Acquire).div_ceil(u64::from(self.block_size));
        if let Some(&(b, _)) = entries.iter().find(|(b, _)| *b >= blocks) {
            return Err(out_of_range(b * u64::from(self.block_size), u64::from(self.block_size), state.size.load(Ordering::Acquire)));
        }
        let mut applied = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(CHUNK_BLOCKS as usize) {
            let mut stripes: Vec<usize> = chunk.iter().map(|(b, _)| self.block_stripe(disk, *b)).collect();
            stripes.sort_unstable();
            stripes.dedup();
            let _guards: Vec<_> = stripes.iter().map(|&i| self.block_stripes[i].write()).collect();
            let blocks: Vec<u64> = chunk.iter().map(|(b, _)| *b).collect();
            let old = self.block_fingerprints(disk, &blocks)?;
            let updates = chunk.iter().map(|(b, fp)| (*b, Target::Existing(*fp))).collect();
            applied.extend(self.commit(&state, updates, &old)?);
        }
        Ok(applied)
    }

    /// A consistent view of a disk's map as of this call: (block number, fingerprint) for every
    /// allocated block, in block order, however long it is read and whatever is written
    /// meanwhile.
    pub fn map_snapshot(&self, disk: DiskId) -> Result<MapSnapshot> {
        let state = self.io_state(disk)?;
        let _layout = state.layout.read();
        let size = state.size.load(Ordering::Acquire);
        let prefix = map_prefix(disk);
        let iter = self.engine.scan(Cf::Maps, &prefix, prefix_end(&prefix).as_deref())?;
        Ok(MapSnapshot { iter, size, block_size: self.block_size })
    }

    // ----- dirty tracking ------------------------------------------------------------------------

    /// Starts (or restarts, empty) tracking which blocks of a disk change.
    pub fn dirty_start(&self, disk: DiskId) -> Result<()> {
        let state = self.io_state(disk)?;
        let blocks = state.size.load(Ordering::Acquire).div_ceil(u64::from(self.block_size));
        *state.dirty.lock() = Some(DirtyBitmap::new(blocks));
        Ok(())
    }

    /// Returns the blocks changed since tracking started or since the last take, and clears
    /// the bitmap, atomically with respect to writes: every write that returned before this
    /// call is in this bitmap or an earlier one.
    pub fn dirty_take(&self, disk: DiskId) -> Result<DirtyBitmap> {
        let state = self.io_state(disk)?;
        let mut dirty = state.dirty.lock();
        let current = dirty.as_mut().ok_or_else(|| StoreError::InvalidArgument(format!("disk #{} is not tracking dirty blocks", disk.0)))?;
        let fresh = DirtyBitmap::new(current.blocks());
        Ok(std::mem::replace(current, fresh))
    }

    pub fn dirty_stop(&self, disk: DiskId) -> Result<()> {
        *self.io_state(disk)?.dirty.lock() = None;
        Ok(())
    }

    // ----- accounting and checking ----------------------------------------------------------------

    pub fn stats(&self) -> Result<StoreStats> {
        let disks = self.list_disks()?;
        let bs = u64::from(self.block_size);
        let mut stored_blocks = 0u64;
        let mut references = 0u64;
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let (_, v) = kv?;
            stored_blocks += 1;
            references += parse_count(&v)?;
        }
        let allocated_bytes = references * bs;
        let stored_bytes = stored_blocks * bs;
        Ok(StoreStats {
            block_size: self.block_size,
            algorithm: self.algorithm,
            disks: disks.len() as u64,
            logical_bytes: disks.iter().map(|d| d.size).sum(),
            allocated_bytes,
            stored_blocks,
            stored_bytes,
            dedupe_ratio: if stored_bytes == 0 { 1.0 } else { allocated_bytes as f64 / stored_bytes as f64 },
            engine_bytes: self.engine.disk_usage_bytes(),
        })
    }

    pub fn disk_stats(&self, name: &str) -> Result<DiskStats> {
        let info = self.disk(name)?;
        let bs = u64::from(self.block_size);
        let mut local: HashMap<Fingerprint, u64> = HashMap::new();
        let mut allocated = 0u64;
        for entry in self.map_snapshot(info.id)? {
            let (_, fp) = entry?;
            allocated += 1;
            *local.entry(fp).or_default() += 1;
        }
        let fps: Vec<Fingerprint> = local.keys().copied().collect();
        let mut exclusive = 0u64;
        for chunk in fps.chunks(4096) {
            for (fp, count) in chunk.iter().zip(self.ref_counts(chunk)?) {
                if count == 1 && local[fp] == 1 {
                    exclusive += 1;
                }
            }
        }
        Ok(DiskStats {
            name: info.name,
            size: info.size,
            allocated_bytes: allocated * bs,
            exclusive_bytes: exclusive * bs,
            shared_bytes: (allocated - exclusive) * bs,
        })
    }

    /// Checks that every reference count equals the number of map entries naming it, that
    /// every mapped block is stored, that no block is stored without references, and (with
    /// `verify_data`) that every stored block re-hashes to its key.
    ///
    /// With an external pool, "stored" means in the pool, with exactly one reference of this
    /// store on each block it maps; the whole pool is listed for references of this store on
    /// blocks it does not map (leaks, which [`Store::repair_references`] gives back), and
    /// `stored_blocks` and `verified_blocks` count this store's blocks. Other stores' blocks
    /// are theirs to check.
    pub fn fsck(&self, verify_data: bool) -> Result<FsckReport> {
        // No delete, resize or rename runs meanwhile (a delete releases references in many
        // batches; seen half-way it would look like damage). Writes from clients still run:
        // on a busy store, a problem fsck reports may be a write in flight; check it again.
        let _catalog = self.catalog.lock();
        let mut report = FsckReport::default();
        let disks: HashMap<DiskId, (String, u64)> = {
            let table = self.disks.read();
            table.by_name.iter().map(|(n, s)| (s.id, (n.clone(), s.size.load(Ordering::Acquire)))).collect()
        };
        report.disks = disks.len() as u64;
        let bs = u64::from(self.block_size);
        // Disks being deleted (a delete in progress, or one a crash interrupted) still own
        // their remaining map entries and the references those hold.
        let deleting: std::collections::HashSet<DiskId> = self
            .engine
            .scan(Cf::Meta, DELETING_PREFIX, prefix_end(DELETING_PREFIX).as_deref())?
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, _)| <[u8; 8]>::try_from(&k[DELETING_PREFIX.len()..]).ok().map(|b| DiskId(u64::from_be_bytes(b))))
            .collect();
        let mut expected: HashMap<Fingerprint, u64> = HashMap::new();
        for kv in self.engine.scan(Cf::Maps, b"", None)? {
            let (k, v) = kv?;
            report.map_entries += 1;
            let (disk, block) = parse_map_key(&k)?;
            let fp = parse_fingerprint(&v)?;
            match disks.get(&disk) {
                None if deleting.contains(&disk) => {}
                None => report.problem(format!("map entry of unknown disk #{} block {block}", disk.0)),
                Some((name, size)) if block >= size.div_ceil(bs) => report.problem(format!("disk {name:?}: block {block} is past the end")),
                Some(_) => {}
            }
            *expected.entry(fp).or_default() += 1;
        }
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let (k, v) = kv?;
            let fp = parse_fingerprint(&k)?;
            let count = parse_count(&v)?;
            let want = expected.remove(&fp).unwrap_or(0);
            if count != want {
                report.problem(format!("block {fp}: reference count {count}, but {want} map entries"));
            }
        }
        for (fp, want) in expected {
            report.problem(format!("block {fp}: {want} map entries but no reference count"));
        }
        if self.pool.is_external() {
            self.fsck_pool(verify_data, &mut report)?;
            return Ok(report);
        }
        let mut ref_keys = self.engine.scan(Cf::Refs, b"", None)?.peekable();
        for kv in self.engine.scan(Cf::Blocks, b"", None)? {
            let (k, v) = kv?;
            report.stored_blocks += 1;
            let fp = parse_fingerprint(&k)?;
            // Both scans are in key order: walk the refs alongside to find blocks without one.
            let mut referenced = false;
            while let Some(Ok((rk, _))) = ref_keys.peek() {
                match rk[..].cmp(&k[..]) {
                    std::cmp::Ordering::Less => {
                        report.problem(format!("block {} has a reference count but is not stored", parse_fingerprint(rk)?));
                        ref_keys.next();
                    }
                    std::cmp::Ordering::Equal => {
                        referenced = true;
                        ref_keys.next();
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            if !referenced {
                report.problem(format!("block {fp} is stored but nothing references it"));
            }
            if v.len() != bs as usize {
                report.problem(format!("block {fp} has {} bytes, not {bs}", v.len()));
            }
            if verify_data {
                report.verified_blocks += 1;
                if self.algorithm.fingerprint(&v) != fp {
                    report.problem(format!("block {fp}: content does not hash to its fingerprint"));
                }
            }
        }
        for kv in ref_keys {
            let (rk, _) = kv?;
            report.problem(format!("block {} has a reference count but is not stored", parse_fingerprint(&rk)?));
        }
        Ok(report)
    }
}

impl Store {
    /// fsck's half for an external pool: this store's references against the pool's.
    fn fsck_pool(&self, verify_data: bool, report: &mut FsckReport) -> Result<()> {
        let bs = self.block_size as usize;
        let mut mine: HashSet<Fingerprint> = HashSet::new();
        let mut chunk: Vec<Fingerprint> = Vec::with_capacity(POOL_BATCH);
        let check = |chunk: &mut Vec<Fingerprint>, report: &mut FsckReport| -> Result<()> {
            if chunk.is_empty() {
                return Ok(());
            }
            let refs = self.pool.holder_refs(&self.holder, chunk)?;
            for (fp, refs) in chunk.iter().zip(&refs) {
                match refs {
                    None => report.problem(format!("block {fp} is mapped but missing from the pool {}", self.pool.location())),
                    Some(0) => report.problem(format!(
                        "block {fp}: the pool holds no reference of this store on it (another store's delete could free it; repair takes it again)"
                    )),
                    Some(1) => {}
                    Some(n) => report.problem(format!("block {fp}: this store holds {n} references in the pool, not 1 (leaked; repair gives them back)")),
                }
                if refs.is_some() {
                    report.stored_blocks += 1;
                }
            }
            if verify_data {
                let datas = self.pool.get_many(chunk)?;
                for (fp, data) in chunk.iter().zip(datas) {
                    let Some(data) = data else { continue };
                    report.verified_blocks += 1;
                    if data.len() != bs {
                        report.problem(format!("block {fp} has {} bytes, not {bs}", data.len()));
                    }
                    if self.algorithm.fingerprint(&data) != *fp {
                        report.problem(format!("block {fp}: content does not hash to its fingerprint"));
                    }
                }
            }
            chunk.clear();
            Ok(())
        };
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let fp = parse_fingerprint(&kv?.0)?;
            mine.insert(fp);
            chunk.push(fp);
            if chunk.len() == POOL_BATCH {
                check(&mut chunk, report)?;
            }
        }
        check(&mut chunk, report)?;
        for block in self.pool.scan(&self.holder)? {
            let block = block?;
            if block.holder_refs > 0 && !mine.contains(&block.fingerprint) {
                report.problem(format!(
                    "block {}: {} leaked reference(s) of this store in the pool (repair gives them back)",
                    block.fingerprint, block.holder_refs
                ));
            }
        }
        for fp in self.pending_intents()? {
            report.problem(format!("block {fp}: a pool operation was interrupted (repair or the next open finishes it)"));
        }
        Ok(())
    }
}

/// See [`Store::map_snapshot`].
pub struct MapSnapshot {
    iter: crate::engine::ScanIter,
    size: u64,
    block_size: u32,
}

impl std::fmt::Debug for MapSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapSnapshot").field("size", &self.size).finish()
    }
}

impl MapSnapshot {
    /// The disk's size when the snapshot was taken.
    pub fn disk_size(&self) -> u64 {
        self.size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Up to `max` further entries (empty at the end).
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<(u64, Fingerprint)>> {
        self.by_ref().take(max).collect()
    }
}

impl Iterator for MapSnapshot {
    type Item = Result<(u64, Fingerprint)>;

    fn next(&mut self) -> Option<Self::Item> {
        let kv = self.iter.next()?;
        Some(kv.and_then(|(k, v)| Ok((parse_map_key(&k)?.1, parse_fingerprint(&v)?))))
    }
}
