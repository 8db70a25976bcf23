//! The key-value engine beneath the store: a small trait (in the spirit of TiKV's engine
//! traits) with a RocksDB implementation and an in-memory one for tests.
//!
//! Everything the store knows how to do with disks, reference counts and fingerprints is
//! written once, against this trait; an engine only stores bytes in column families, applies
//! batches atomically and iterates key ranges at a point in time.

mod memory;
mod rocks;

pub use memory::MemEngine;
#[cfg(test)]
use rocks::INGEST_DIR;
pub use rocks::{RocksEngine, RocksTuning};

use std::fmt;

use crate::Result;

/// The column families of a store. See the crate docs for the key and value layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Store configuration and bookkeeping (format version, block size, algorithm, ids).
    Meta,
    /// Disk name -> disk metadata (JSON).
    Disks,
    /// Disk id (u64 BE) ++ block number (u64 BE) -> fingerprint (16 bytes).
    Maps,
    /// Fingerprint -> reference count (u64 LE) and location in the containers.
    Refs,
    /// Fingerprint -> block bytes: stores of format 1 only (blocks are in containers since).
    Blocks,
    /// Super-feature (index u8, value u64 BE) -> location of a block that has it: the
    /// resemblance index (see `Store::update_sketches`).
    Sketches,
}

impl Cf {
    pub const ALL: [Cf; 6] = [Cf::Meta, Cf::Disks, Cf::Maps, Cf::Refs, Cf::Blocks, Cf::Sketches];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Disks => "disks",
            Cf::Maps => "maps",
            Cf::Refs => "refs",
            Cf::Blocks => "blocks",
            Cf::Sketches => "sketches",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One operation of a [`WriteBatch`].
#[derive(Debug, Clone)]
pub enum BatchOp {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    /// Every key in `[start, end)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
    /// A merge operand (refs only): a u64 LE addend to the value's leading counter.
    AddToCount(Cf, Vec<u8>, Vec<u8>),
}

/// The refs column family's merge: each operand (a u64 LE addend) is added to the counter
/// that leads the value (its first 8 bytes, u64 LE); the rest of the value (a block's
/// location) stays. A missing value counts from zero with nothing after the counter. None
/// (a corrupt operand or value): the engine reports the key corrupt when it is read.
pub(crate) fn add_to_counter<'a>(existing: Option<&[u8]>, addends: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut value = existing.map_or_else(|| vec![0u8; 8], <[u8]>::to_vec);
    let mut count = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    for a in addends {
        count = count.checked_add(u64::from_le_bytes(a.try_into().ok()?))?;
    }
    value[..8].copy_from_slice(&count.to_le_bytes());
    Some(value)
}

/// Operations applied atomically by [`KvEngine::write`]: all or none survive a crash.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub(crate) ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }
    /// A batch with room for `ops` operations (a commit knows how many it will add).
    pub fn with_capacity(ops: usize) -> WriteBatch {
        WriteBatch { ops: Vec::with_capacity(ops) }
    }
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put(cf, key.into(), value.into()));
    }
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete(cf, key.into()));
    }
    /// Deletes every key in `[start, end)` (one tombstone, however many keys).
    pub fn delete_range(&mut self, cf: Cf, start: &[u8], end: &[u8]) {
        self.ops.push(BatchOp::DeleteRange(cf, start.to_vec(), end.to_vec()));
    }
    /// Adds `n` to the counter that leads the value of `key` in [`Cf::Refs`] (see
    /// [`add_to_counter`]) without reading it: the engine applies it when the key is read.
    pub fn add_to_count(&mut self, key: impl Into<Vec<u8>>, n: u64) {
        self.ops.push(BatchOp::AddToCount(Cf::Refs, key.into(), n.to_le_bytes().to_vec()));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A key and its value, as returned by a scan.
pub type KvPair = (Box<[u8]>, Box<[u8]>);

/// A scan over a key range that sees the engine as it was when the scan was created, however
/// long it is kept and whatever is written meanwhile.
pub type ScanIter = Box<dyn Iterator<Item = Result<KvPair>> + Send>;

/// A byte-oriented, column-family key-value engine.
pub trait KvEngine: Send + Sync + fmt::Debug {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Point lookups of many keys at once (RocksDB's batched MultiGet), in the keys' order.
    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>>;

    /// Whether each key is present, in the keys' order (no value is copied).
    fn contains_many(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<bool>> {
        Ok(self.multi_get(cf, keys)?.into_iter().map(|v| v.is_some()).collect())
    }

    /// Applies a batch atomically. Not synced: see [`KvEngine::sync`].
    fn write(&self, batch: WriteBatch) -> Result<()>;

    /// Makes every write that has returned durable (survives power loss, not only a crash of
    /// the process).
    fn sync(&self) -> Result<()>;

    /// Keys in `[start, end)` (`end` None: to the end of the column family), in key order, as
    /// of the moment of the call.
    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter>;

    /// Visits the entries in `[start, end)` in key order: a range read on the hot path (one
    /// seek, then the following keys, nothing copied), which fills the engine's caches like a
    /// point lookup does. The caller bounds the range. An error from `visit` ends the walk.
    fn for_each_in(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        for kv in self.scan(cf, start, Some(end))? {
            let (k, v) = kv?;
            visit(&k, &v)?;
        }
        Ok(())
    }

    /// Adds `entries`, given in strictly increasing key order, to `cf` at once and outside
    /// the write path (RocksDB writes them as a table file and links it in: no memtable
    /// inserts, no write-ahead log), for a key range nothing else writes meanwhile (a new
    /// disk's map). All or none become visible, and they are durable when this returns.
    /// Returns how many were added. The default applies them as one batch.
    fn ingest_sorted(&self, cf: Cf, entries: &mut dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>)>>) -> Result<u64> {
        self.ingest_sorted_changes(cf, &mut entries.map(|e| e.map(|(k, v)| (k, Some(v)))))
    }

    /// [`KvEngine::ingest_sorted`] with deletions (a None value), for keys whose other writers
    /// are excluded by the caller meanwhile (the reference journal's folds, see
    /// `store::refs_log`): the file's entries are newer than everything written before.
    fn ingest_sorted_changes(&self, cf: Cf, entries: &mut dyn Iterator<Item = Result<(Vec<u8>, Option<Vec<u8>>)>>) -> Result<u64> {
        let mut batch = WriteBatch::new();
        let mut added = 0;
        for entry in entries {
            match entry? {
                (key, Some(value)) => batch.put(cf, key, value),
                (key, None) => batch.delete(cf, key),
            }
            added += 1;
        }
        self.write(batch)?;
        Ok(added)
    }

    /// Starts `cf` on an empty memtable, the full one flushed in the background: a burst of
    /// writes about to land all over the column family (the counts a disk copy raises) then
    /// inserts into a small, cache-resident skiplist instead of a large one. The default does
    /// nothing.
    fn fresh_memtable(&self, _cf: Cf) -> Result<()> {
        Ok(())
    }

    /// Bytes the engine's data occupies, if it can tell: its files, plus what its memtables
    /// hold that is not in a file yet (the write-ahead log, which duplicates it, is left out).
    fn disk_usage_bytes(&self) -> Option<u64> {
        None
    }

    /// What the engine holds in memory, if it can tell.
    fn memory(&self) -> Option<EngineMemory> {
        None
    }
}

/// Memory an engine holds, by purpose (RocksDB's own figures).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineMemory {
    /// Memtables, active and immutable (not yet flushed), of every column family.
    pub memtable_bytes: u64,
    /// The block cache's use (data, index and filter blocks; and memtables when charged to it).
    pub block_cache_bytes: u64,
    /// Table readers' memory outside the block cache.
    pub table_reader_bytes: u64,
}

/// The smallest key greater than every key that starts with `prefix` (None: no such key).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(engine: &dyn KvEngine) {
        let mut b = WriteBatch::new();
        b.put(Cf::Maps, vec![1, 1], vec![10]);
        b.put(Cf::Maps, vec![1, 2], vec![20]);
        b.put(Cf::Maps, vec![2, 0], vec![30]);
        b.put(Cf::Refs, vec![1, 1], vec![99]);
        engine.write(b).unwrap();
        assert_eq!(engine.get(Cf::Maps, &[1, 2]).unwrap(), Some(vec![20]));
        assert_eq!(engine.get(Cf::Blocks, &[1, 2]).unwrap(), None);
        let got = engine.multi_get(Cf::Maps, &[&[2, 0], &[9], &[1, 1]]).unwrap();
        assert_eq!(got, vec![Some(vec![30]), None, Some(vec![10])]);

        // A scan sees the state at its creation, not later writes.
        let scan = engine.scan(Cf::Maps, &[1], prefix_end(&[1]).as_deref()).unwrap();
        let mut b = WriteBatch::new();
        b.delete(Cf::Maps, vec![1, 1]);
        b.put(Cf::Maps, vec![1, 3], vec![40]);
        engine.write(b).unwrap();
        let keys: Vec<Vec<u8>> = scan.map(|kv| kv.unwrap().0.to_vec()).collect();
        assert_eq!(keys, vec![vec![1, 1], vec![1, 2]]);
        let now: Vec<Vec<u8>> = engine.scan(Cf::Maps, &[1], None).unwrap().map(|kv| kv.unwrap().0.to_vec()).collect();
        assert_eq!(now, vec![vec![1, 2], vec![1, 3], vec![2, 0]]);
        // Counts raised without reading them keep what follows the counter.
        let mut b = WriteBatch::new();
        b.put(Cf::Refs, vec![7; 16], [5u64.to_le_bytes().to_vec(), vec![0xAB; 12]].concat());
        b.add_to_count(vec![7; 16], 3);
        engine.write(b).unwrap();
        let mut b = WriteBatch::new();
        b.add_to_count(vec![7; 16], 2);
        b.add_to_count(vec![8; 16], 4);
        engine.write(b).unwrap();
        assert_eq!(engine.get(Cf::Refs, &[7; 16]).unwrap(), Some([10u64.to_le_bytes().to_vec(), vec![0xAB; 12]].concat()));
        assert_eq!(engine.multi_get(Cf::Refs, &[&[8; 16]]).unwrap(), vec![Some(4u64.to_le_bytes().to_vec())]);
        let scanned: Vec<_> = engine.scan(Cf::Refs, &[7; 16], None).unwrap().map(|kv| kv.unwrap().1.to_vec()).collect();
        assert_eq!(scanned[0], [10u64.to_le_bytes().to_vec(), vec![0xAB; 12]].concat());
        engine.sync().unwrap();
        // Sorted entries go in at once, beside what the write path put there.
        let ingested: Vec<(Vec<u8>, Vec<u8>)> = (0u8..200).map(|i| (vec![9, i], vec![i; 40])).collect();
        assert_eq!(engine.ingest_sorted(Cf::Maps, &mut ingested.clone().into_iter().map(Ok)).unwrap(), 200);
        assert_eq!(engine.ingest_sorted(Cf::Maps, &mut std::iter::empty()).unwrap(), 0);
        let scanned: Vec<_> = engine.scan(Cf::Maps, &[9], Some(&[10])).unwrap().map(|kv| kv.unwrap()).collect();
        assert_eq!(scanned.len(), 200);
        assert!(scanned.iter().zip(&ingested).all(|((k, v), (ek, ev))| &k[..] == ek && &v[..] == ev));
    }

    #[test]
    fn memory_engine_semantics() {
        exercise(&MemEngine::new());
    }

    #[test]
    fn rocks_engine_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let engine = RocksEngine::open(dir.path(), &RocksTuning::default()).unwrap();
        exercise(&engine);
        assert!(engine.disk_usage_bytes().is_some());
        // Merged counts survive a reopen (WAL replay, then the flush of the recovered data).
        drop(engine);
        let engine = RocksEngine::open(dir.path(), &RocksTuning::default()).unwrap();
        assert_eq!(engine.get(Cf::Refs, &[7; 16]).unwrap(), Some([10u64.to_le_bytes().to_vec(), vec![0xAB; 12]].concat()));
        // Ingested entries are durable, and no table file is left in the ingest directory.
        assert_eq!(engine.get(Cf::Maps, &[9, 199]).unwrap(), Some(vec![199; 40]));
        assert_eq!(std::fs::read_dir(dir.path().join(INGEST_DIR)).map_or(0, |d| d.count()), 0);
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
