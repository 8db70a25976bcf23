//! What migration needs of a store: batched lookups and reads by fingerprint, mapping blocks
//! a neighbour holds, point-in-time map snapshots, and dirty-block tracking.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{out_of_range, DiskId, Store, Target, CHUNK_BLOCKS};
use crate::dirty::DirtyBitmap;
use crate::engine::Cf;
use crate::{Fingerprint, Result, StoreError};

impl Store {
    /// For each fingerprint, whether the store holds its block (one batched lookup). With an
    /// external pool: whether the pool holds it, whichever store wrote it, so a migration into
    /// any server of a datacentre finds the blocks of every server sharing its pool.
    pub fn has_many(&self, fps: &[Fingerprint]) -> Result<Vec<bool>> {
        match self.external_pool() {
            Some(pool) => pool.has_many(fps),
            None => {
                // The small `refs` entries answer; no block bytes are touched.
                self.overlay_then_refs(fps, |e| e.is_some(), |keys| self.engine.contains_many(Cf::Refs, keys))
            }
        }
    }

    /// How many block references the store holds to each content (None: not stored here, or
    /// its blocks live in an external pool, which counts references for every store sharing
    /// it). A gang migration sends content that several disks use first.
    pub fn reference_counts(&self, fps: &[Fingerprint]) -> Result<Vec<Option<u64>>> {
        if self.external_pool().is_some() {
            return Ok(vec![None; fps.len()]);
        }
        Ok(self.ref_entries(fps)?.into_iter().map(|e| e.map(|e| e.count)).collect())
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
        Ok(self.map_lookup_many(disk, blocks)?.into_iter().map(|e| e.map(|e| e.fp)).collect())
    }

    /// Maps blocks of a disk to blocks the store already holds (no data moves: a neighbour
    /// has them). Returns, per entry, whether it was mapped; an entry whose fingerprint is not
    /// stored is left alone.
    pub fn map_existing(&self, disk: DiskId, entries: &[(u64, Fingerprint)]) -> Result<Vec<bool>> {
        self.commit_scattered(disk, entries.iter().map(|(b, fp)| (*b, Target::Existing(*fp))).collect())
    }

    /// Writes whole blocks at scattered block numbers, each with the fingerprint the caller
    /// has already checked it against (migration: every arrived block is verified against
    /// the fingerprint it was asked for): one engine commit per chunk of blocks rather than
    /// one per block, and no second hash. A block whose fingerprint is not its content's
    /// would be a lie the store cannot see: `fsck --verify` finds it.
    pub fn write_verified_blocks(&self, disk: DiskId, blocks: &[(u64, Fingerprint, &[u8])]) -> Result<()> {
        let bs = self.block_size as usize;
        if let Some(&(b, _, d)) = blocks.iter().find(|(_, _, d)| d.len() != bs) {
            return Err(StoreError::InvalidArgument(format!("block {b}: {} bytes, not one block of {bs}", d.len())));
        }
        let updates = blocks
            .iter()
            .map(|&(b, fp, d)| (b, if super::is_zero(d) { Target::Zero } else { Target::Data { fp, bytes: std::borrow::Cow::Borrowed(d) } }))
            .collect();
        self.commit_scattered(disk, updates)?;
        Ok(())
    }

    /// Commits updates of scattered blocks, a chunk at a time under the chunk's block stripes.
    /// A block named more than once takes its last update (as writes in that order would):
    /// one commit reads each block's old content once, so a repeated block would otherwise
    /// count its new content's reference twice for one map entry.
    fn commit_scattered(&self, disk: DiskId, updates: Vec<(u64, Target<'_>)>) -> Result<Vec<bool>> {
        let mut last: HashMap<u64, usize> = HashMap::with_capacity(updates.len());
        for (i, (b, _)) in updates.iter().enumerate() {
            last.insert(*b, i);
        }
        if last.len() == updates.len() {
            return self.commit_distinct(disk, updates);
        }
        let blocks: Vec<u64> = updates.iter().map(|(b, _)| *b).collect();
        let distinct: Vec<(u64, Target<'_>)> = updates.into_iter().enumerate().filter(|(i, (b, _))| last[b] == *i).map(|(_, u)| u).collect();
        let order: HashMap<u64, usize> = distinct.iter().enumerate().map(|(i, (b, _))| (*b, i)).collect();
        let applied = self.commit_distinct(disk, distinct)?;
        Ok(blocks.iter().map(|b| applied[order[b]]).collect())
    }

    fn commit_distinct(&self, disk: DiskId, mut updates: Vec<(u64, Target<'_>)>) -> Result<Vec<bool>> {
        let state = self.io_state(disk)?;
        state.check_writable(|| format!("#{}", disk.0))?;
        let _layout = state.layout.read();
        let blocks = state.size.load(Ordering::Acquire).div_ceil(u64::from(self.block_size));
        if let Some(&(b, _)) = updates.iter().find(|(b, _)| *b >= blocks) {
            return Err(out_of_range(b * u64::from(self.block_size), u64::from(self.block_size), state.size.load(Ordering::Acquire)));
        }
        let mut applied = Vec::with_capacity(updates.len());
        while !updates.is_empty() {
            let rest = updates.split_off(updates.len().min(CHUNK_BLOCKS as usize));
            let chunk = std::mem::replace(&mut updates, rest);
            let stripes = self.stripe_indices(disk, chunk.iter().map(|(b, _)| *b));
            let _guards: Vec<_> = stripes.iter().map(|&i| self.block_stripes[i].write()).collect();
            let blocks: Vec<u64> = chunk.iter().map(|(b, _)| *b).collect();
            // Not through the map cache: a migration's destination maps each block once, and
            // would only fill the cache with entries nobody asks for again.
            let old = self.block_fingerprints(disk, &blocks)?;
            applied.extend(self.commit(&state, chunk, &old)?);
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
        // The overlay's entries of the disk are copied (at most the overlay's cap), `maps` is
        // read through the engine's consistent iterator.
        let iter = self.map_scan(disk, 0, u64::MAX, usize::MAX)?;
        Ok(MapSnapshot { iter, size, block_size: self.block_size })
    }

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
}

/// See [`Store::map_snapshot`].
pub struct MapSnapshot {
    iter: super::map_view::MapScan,
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
        Some(self.iter.next()?.map(|(block, entry)| (block, entry.fp)))
    }
}
