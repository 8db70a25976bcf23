//! The catalogue of disks: create, list, rename, resize and delete, and the deletes a crash
//! interrupted.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{DiskId, DiskInfo, DiskMeta, DiskState, Source, Store, Target, CHUNK_BLOCKS};
use crate::engine::{prefix_end, Cf, WriteBatch};
use crate::keys::*;
use crate::{Fingerprint, Result, StoreError};

impl Store {
    pub(super) fn load_catalog(&self) -> Result<()> {
        let mut table = self.disks.write();
        for kv in self.engine.scan(Cf::Disks, b"", None)? {
            let (key, value) = kv?;
            let name = String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt("disk name is not UTF-8".into()))?;
            let meta: DiskMeta = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt(format!("metadata of disk {name:?}: {e}")))?;
            let state = Arc::new(DiskState::from_meta(&meta));
            table.names.insert(state.id, name.clone());
            table.by_name.insert(name, state);
        }
        Ok(())
    }

    /// A delete or a copy that was interrupted by a crash left a marker; finish it.
    pub(super) fn finish_interrupted_deletes(&self) -> Result<()> {
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
            self.finish_deletion(id)?;
        }
        Ok(())
    }

    /// Releases what is left of a disk that a deletion marker names, then drops the marker.
    /// An empty marker (a delete) means every remaining map entry holds a reference; a copy's
    /// (see `snapshot.rs`) means only the entries in the block ranges its `counted/` records
    /// name do, and the rest are dropped without releasing anything.
    pub(super) fn finish_deletion(&self, id: DiskId) -> Result<()> {
        let state = DiskState::new(id, 0);
        let mut batch = WriteBatch::new();
        match self.engine.get(Cf::Meta, &deleting_key(id))?.as_deref() {
            None => return Ok(()),
            Some([]) => self.release_blocks_from(&state, 0)?,
            Some(_copy) => {
                for (first, end) in self.counted_ranges(id)? {
                    self.release_blocks_between(&state, first, end)?;
                    batch.delete(Cf::Meta, counted_key(id, first));
                }
                self.drop_map_entries_from(id, 0)?;
            }
        }
        batch.delete(Cf::Meta, deleting_key(id));
        self.engine.write(batch)
    }

    /// The block ranges (first, end) whose counts a copy into disk `id` has raised so far.
    pub(super) fn counted_ranges(&self, id: DiskId) -> Result<Vec<(u64, u64)>> {
        let prefix = counted_prefix(id);
        self.engine
            .scan(Cf::Meta, &prefix, prefix_end(&prefix).as_deref())?
            .map(|kv| {
                let (k, v) = kv?;
                let first = k.get(prefix.len()..).and_then(|b| <[u8; 8]>::try_from(b).ok()).ok_or_else(|| StoreError::Corrupt("bad copy record".into()))?;
                Ok((u64::from_be_bytes(first), parse_count(&v)?))
            })
            .collect()
    }

    /// Deletes the map entries of disk `id` at block `from` or later without touching any
    /// count (entries whose references were never counted).
    fn drop_map_entries_from(&self, id: DiskId, from: u64) -> Result<()> {
        let end = map_key(id, u64::MAX);
        let mut from = from;
        loop {
            let keys: Vec<Box<[u8]>> = self
                .engine
                .scan(Cf::Maps, &map_key(id, from), Some(&end))?
                .take(CHUNK_BLOCKS as usize * 4)
                .map(|kv| kv.map(|(k, _)| k))
                .collect::<Result<_>>()?;
            let Some(last) = keys.last() else {
                return Ok(());
            };
            from = parse_map_key(last)?.1 + 1;
            let mut batch = WriteBatch::new();
            for key in keys {
                batch.delete(Cf::Maps, key.into_vec());
            }
            self.engine.write(batch)?;
        }
    }

    pub(super) fn validate_name(name: &str) -> Result<()> {
        let ok = !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@+".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(StoreError::InvalidArgument(format!("disk name {name:?}: use 1 to 255 characters from A-Z a-z 0-9 - _ . : @ +")))
        }
    }

    pub(super) fn validate_size(size: u64) -> Result<()> {
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
        let next = self.next_disk_id()?;
        let id = DiskId(next);
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, NEXT_DISK_ID_KEY, encode_count(next + 1));
        let state = DiskState::new(id, size);
        batch.put(Cf::Disks, name.as_bytes(), serde_json::to_vec(&state.meta(size)).expect("json"));
        self.engine.write(batch)?;
        let info = state.info(name);
        let mut table = self.disks.write();
        table.names.insert(id, name.to_string());
        table.by_name.insert(name.to_string(), Arc::new(state));
        Ok(info)
    }

    /// The id the next new disk gets (the caller holds the catalogue lock and writes the
    /// one after it back with the disk).
    pub(super) fn next_disk_id(&self) -> Result<u64> {
        Ok(match self.engine.get(Cf::Meta, NEXT_DISK_ID_KEY)? {
            Some(v) => parse_count(&v)?,
            None => 1,
        })
    }

    pub fn disk(&self, name: &str) -> Result<DiskInfo> {
        let table = self.disks.read();
        let state = table.by_name.get(name).ok_or_else(|| StoreError::DiskNotFound(name.to_string()))?;
        Ok(state.info(name))
    }

    /// All disks, sorted by name.
    pub fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        let table = self.disks.read();
        let mut disks: Vec<DiskInfo> = table.by_name.iter().map(|(name, s)| s.info(name)).collect();
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(disks)
    }

    pub(super) fn state(&self, disk: DiskId) -> Result<Arc<DiskState>> {
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
        let meta = state.meta(state.size.load(Ordering::Acquire));
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
        state.check_writable(|| name.to_string())?;
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
        batch.put(Cf::Disks, name.as_bytes(), serde_json::to_vec(&state.meta(size)).expect("json"));
        self.engine.write(batch)?;
        state.size.store(size, Ordering::Release);
        if let Some(d) = state.dirty.lock().as_mut() {
            d.grow(size.div_ceil(u64::from(self.block_size)));
        }
        Ok(state.info(name))
    }

    /// Releases every map entry of `state` at block `from` or later, in bounded batches.
    pub(super) fn release_blocks_from(&self, state: &DiskState, from: u64) -> Result<()> {
        // The all-ones block number is outside every disk (sizes are at most 1 EiB).
        self.release_blocks_between(state, from, u64::MAX)
    }

    /// Releases the map entries of `state` in blocks `from..until`, in bounded batches.
    pub(super) fn release_blocks_between(&self, state: &DiskState, from: u64, until: u64) -> Result<()> {
        let chunk = CHUNK_BLOCKS as usize * 4;
        let mut from = from;
        while from < until {
            let mut scan = self.map_scan(state.id, from, until, chunk)?;
            let entries: Vec<(u64, Fingerprint)> = scan.by_ref().take(chunk).map(|e| e.map(|(block, e)| (block, e.fp))).collect::<Result<_>>()?;
            // The next scan starts past this chunk: starting again at `from` would walk over
            // the tombstones of every chunk before it (quadratic on a large disk). A chunk of
            // the overlay's holes only is skipped whole.
            from = match entries.last() {
                Some(e) if entries.len() == chunk => e.0 + 1,
                _ => scan.end(),
            };
            if entries.is_empty() {
                continue;
            }
            let old: Vec<Option<Fingerprint>> = entries.iter().map(|e| Some(e.1)).collect();
            let updates = entries.iter().map(|e| (e.0, Target::Zero)).collect();
            self.commit(state, updates, &old)?;
        }
        Ok(())
    }
}
