//! Block bytes in large append-only container files, the way production deduplicating stores
//! keep them (VDO's slabs, borg's segments, restic's packs), with the key-value engine keeping
//! only the small things (maps, and fingerprint -> count and location).
//!
//! A container is a file of `slots_per_container` slots of one block each, filled in order.
//! Appends of concurrent writers reserve slots under a short lock and write outside it, so
//! many requests fill one container at once. A slot whose block died may be written again by
//! a small write once that death is durable ([`free_slots`] has the rules); otherwise a
//! slot's bytes never change while its container exists. A block read is one `pread` from
//! the page cache straight into the caller's buffer (the fingerprint is the checksum: fsck
//! re-hashes, and [`crate::StoreOptions::verify_reads`] re-hashes every read).
//!
//! Container ids are never reused (the next id is recorded in the engine before a container is
//! created), so a location that names a container compaction has deleted fails to resolve
//! instead of reading another block's bytes.
//!
//! Durability: data reaches the file with `pwrite` before the engine batch that names it is
//! written, so a crash of the process (kill -9) loses nothing that returned; [`Containers::sync`]
//! fdatasyncs the containers written since the last sync, and the store calls it before it
//! syncs the engine's log (FLUSH, FUA), so synced data is always on disk before the index entry
//! that names it.

mod files;
mod free_slots;

pub use files::{ContainerDir, ContainerFile, FsContainerDir, MemContainerDir};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use free_slots::FreeSlots;

use crate::{Result, StoreError};

/// Appends of at most this many blocks take the slots of dead blocks first (the small
/// writes of a VM's random I/O); larger ones go to the end of the active container in
/// order, so that a sequential read of what they stored reads runs of consecutive slots.
const REUSE_MAX_BLOCKS: usize = 8;

/// Where a block's bytes are: a container and a slot in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub container: u32,
    pub slot: u32,
}

impl Location {
    pub const ENCODED_LEN: usize = 8;

    pub fn encode(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.container.to_le_bytes());
        b[4..].copy_from_slice(&self.slot.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Location> {
        let b: [u8; 8] = b.try_into().ok()?;
        Some(Location { container: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")), slot: u32::from_le_bytes(b[4..].try_into().expect("4 bytes")) })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.container, self.slot)
    }
}

/// The container being appended to.
struct Active {
    id: u32,
    file: Arc<dyn ContainerFile>,
    next_slot: u32,
}

/// Reuse of dead slots is paused while this lives (see [`Containers::pause_reuse`]).
#[must_use]
pub struct ReusePaused<'a>(&'a Containers);

impl fmt::Debug for ReusePaused<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReusePaused")
    }
}

impl Drop for ReusePaused<'_> {
    fn drop(&mut self) {
        self.0.free.lock().resume();
    }
}

/// Records the id the next container will take, durably enough that an id is never handed
/// out twice (the store writes it to its engine).
pub trait ContainerIds: Send + Sync {
    fn reserve(&self, next: u32) -> Result<()>;
}

/// The containers of one store.
pub struct Containers {
    dir: Arc<dyn ContainerDir>,
    block_size: u32,
    slots_per_container: u32,
    open: RwLock<BTreeMap<u32, Arc<dyn ContainerFile>>>,
    active: Mutex<Option<Active>>,
    next_id: Mutex<u32>,
    /// Containers written since the last sync.
    unsynced: Mutex<BTreeSet<u32>>,
    /// Slots of dead blocks (see [`free_slots`]).
    free: Mutex<FreeSlots>,
    /// Held (shared) by readers that find a block by its fingerprint, from the lookup of its
    /// location to the read; slots become ready for reuse only under it held exclusively.
    reuse_gate: RwLock<()>,
}

impl fmt::Debug for Containers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Containers").field("dir", &self.dir).field("slots_per_container", &self.slots_per_container).finish()
    }
}

impl Containers {
    /// Opens the containers in `dir`. `recorded_next` is the next id the engine recorded; the
    /// first new container takes the larger of it and one past every container found.
    /// Appends always start in a new container, so nothing written before a crash is appended to.
    pub fn open(dir: Arc<dyn ContainerDir>, block_size: u32, container_bytes: u64, recorded_next: u32) -> Result<Containers> {
        let slots_per_container = u32::try_from((container_bytes / u64::from(block_size)).max(1)).unwrap_or(u32::MAX);
        let mut open = BTreeMap::new();
        for (id, file) in dir.open_all()? {
            open.insert(id, file);
        }
        let next = open.keys().next_back().map_or(0, |&id| id + 1).max(recorded_next);
        Ok(Containers {
            dir,
            block_size,
            slots_per_container,
            open: RwLock::new(open),
            active: Mutex::new(None),
            next_id: Mutex::new(next),
            unsynced: Mutex::new(BTreeSet::new()),
            free: Mutex::new(FreeSlots::default()),
            reuse_gate: RwLock::new(()),
        })
    }

    /// Stores `blocks` (each `block_size` bytes), returning their locations in order. A few
    /// blocks take ready slots of dead blocks first; the rest are appended, consecutive blocks
    /// in consecutive slots where they can, written with one `pwrite`.
    pub fn append(&self, blocks: &[&[u8]], ids: &dyn ContainerIds) -> Result<Vec<Location>> {
        let bs = self.block_size as usize;
        let mut out = Vec::with_capacity(blocks.len());
        let mut rest = blocks;
        if blocks.len() <= REUSE_MAX_BLOCKS {
            while let Some((block, more)) = rest.split_first() {
                let Some((file, loc)) = self.take_free_slot() else { break };
                file.write_at(block, u64::from(loc.slot) * bs as u64)?;
                self.written(loc.container);
                out.push(loc);
                rest = more;
            }
        }
        while !rest.is_empty() {
            let (file, id, first_slot, n) = self.reserve(rest.len(), ids)?;
            let run = &rest[..n];
            let offset = u64::from(first_slot) * bs as u64;
            if n == 1 {
                file.write_at(run[0], offset)?;
            } else {
                file.write_blocks_at(run, offset)?;
            }
            self.written(id);
            out.extend((0..n as u32).map(|i| Location { container: id, slot: first_slot + i }));
            rest = &rest[n..];
        }
        Ok(out)
    }

    /// Marks container `id` for the next sync, once a write into it has returned: marked
    /// before, a sync running meanwhile could take the mark and finish before the write lands,
    /// and a FLUSH after this write's reply would then skip the container.
    fn written(&self, id: u32) {
        self.unsynced.lock().insert(id);
    }

    /// A ready slot of a dead block and its container.
    fn take_free_slot(&self) -> Option<(Arc<dyn ContainerFile>, Location)> {
        loop {
            let loc = self.free.lock().take()?;
            // Compaction forgets every slot before it deletes a container; a slot of a
            // container that is gone anyway is skipped.
            if let Some(file) = self.get(loc.container) {
                return Some((file, loc));
            }
        }
    }

    /// Records slots whose blocks died in an engine batch that has been written (they become
    /// reusable once a sync of the engine's log that began after this is done).
    pub fn freed(&self, slots: impl IntoIterator<Item = Location>) {
        self.free.lock().freed(slots);
    }

    /// Whether freed slots wait for a sync of the engine's log.
    pub fn has_pending_free(&self) -> bool {
        self.free.lock().has_pending()
    }

    /// Called before a sync of the engine's log; pass the epoch to [`Containers::free_synced`]
    /// once it is done.
    pub fn begin_free_sync(&self) -> u64 {
        self.free.lock().begin_sync()
    }

    /// The sync of the engine's log that began at `epoch` is done: the slots freed before it
    /// began may be taken, once no reader by fingerprint that may have looked one up runs.
    pub fn free_synced(&self, epoch: u64) {
        let _grace = self.reuse_gate.write();
        self.free.lock().synced(epoch);
    }

    /// [`Containers::free_synced`] if no reader by fingerprint runs now (a FLUSH does not
    /// wait for them: the slots stay pending for the next sync).
    pub fn try_free_synced(&self, epoch: u64) {
        if let Some(_grace) = self.reuse_gate.try_write() {
            self.free.lock().synced(epoch);
        }
    }

    /// Held by a reader that finds blocks by fingerprint, from the lookup of their locations
    /// to their reads. Never taken twice by one thread.
    pub fn reuse_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.reuse_gate.read()
    }

    /// Stops the reuse of dead slots until the guard drops, forgetting every slot known now:
    /// compaction takes this before it counts live blocks.
    pub fn pause_reuse(&self) -> ReusePaused<'_> {
        self.free.lock().pause();
        ReusePaused(self)
    }

    /// Reserves up to `want` consecutive slots in the active container (a new one when it is
    /// full or there is none).
    fn reserve(&self, want: usize, ids: &dyn ContainerIds) -> Result<(Arc<dyn ContainerFile>, u32, u32, usize)> {
        let mut active = self.active.lock();
        if active.as_ref().is_none_or(|a| a.next_slot >= self.slots_per_container) {
            let id = {
                let mut next = self.next_id.lock();
                let id = *next;
                let after = id.checked_add(1).ok_or_else(|| StoreError::Engine("container ids exhausted".into()))?;
                ids.reserve(after)?;
                *next = after;
                id
            };
            let file = self.dir.create(id)?;
            self.open.write().insert(id, file.clone());
            *active = Some(Active { id, file, next_slot: 0 });
        }
        let a = active.as_mut().expect("an active container");
        let n = want.min((self.slots_per_container - a.next_slot) as usize);
        let first = a.next_slot;
        a.next_slot += n as u32;
        Ok((a.file.clone(), a.id, first, n))
    }

    /// The open container `id`, if it exists.
    pub fn get(&self, id: u32) -> Option<Arc<dyn ContainerFile>> {
        self.open.read().get(&id).cloned()
    }

    /// Reads the block at `loc` into `buf` (`block_size` bytes, or a multiple for a run of
    /// consecutive slots). Err(Missing) if its container does not exist.
    pub fn read(&self, loc: Location, buf: &mut [u8]) -> Result<()> {
        let file = self.get(loc.container).ok_or(StoreError::Corrupt(format!("container {} of block at {loc} does not exist", loc.container)))?;
        file.read_at(buf, u64::from(loc.slot) * u64::from(self.block_size))
    }

    /// Makes every append that has returned durable.
    pub fn sync(&self) -> Result<()> {
        let pending: Vec<u32> = std::mem::take(&mut *self.unsynced.lock()).into_iter().collect();
        for id in &pending {
            if let Some(file) = self.get(*id) {
                if let Err(e) = file.sync() {
                    // Not synced: keep it for the next sync to try again.
                    self.unsynced.lock().extend(pending.iter().copied());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Every container: (id, slots written or allocated, bytes it occupies on disk).
    pub fn list(&self) -> Result<Vec<(u32, u64, u64)>> {
        let files: Vec<(u32, Arc<dyn ContainerFile>)> = self.open.read().iter().map(|(k, v)| (*k, v.clone())).collect();
        let bs = u64::from(self.block_size);
        files
            .into_iter()
            .map(|(id, f)| {
                let bytes = f.len()?;
                Ok((id, bytes.div_ceil(bs), bytes))
            })
            .collect()
    }

    /// The container being appended to (compaction leaves it alone).
    pub fn active_id(&self) -> Option<u32> {
        self.active.lock().as_ref().map(|a| a.id)
    }

    /// Deletes container `id`. Readers that already hold it keep reading its bytes (an open
    /// file outlives its name); later lookups fail to resolve it.
    pub fn remove(&self, id: u32) -> Result<()> {
        {
            let active = self.active.lock();
            if active.as_ref().is_some_and(|a| a.id == id) {
                return Err(StoreError::InvalidArgument(format!("container {id} is being appended to")));
            }
        }
        self.open.write().remove(&id);
        self.unsynced.lock().remove(&id);
        self.dir.remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoIds;
    impl ContainerIds for NoIds {
        fn reserve(&self, _: u32) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn appends_fill_containers_in_order_and_read_back() {
        let dir = Arc::new(MemContainerDir::default());
        let c = Containers::open(dir.clone(), 512, 4 * 512, 0).unwrap();
        let blocks: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 512]).collect();
        let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
        let locs = c.append(&refs, &NoIds).unwrap();
        assert_eq!(locs[0], Location { container: 0, slot: 0 });
        assert_eq!(locs[3], Location { container: 0, slot: 3 });
        assert_eq!(locs[4], Location { container: 1, slot: 0 });
        for (i, loc) in locs.iter().enumerate() {
            let mut buf = vec![0u8; 512];
            c.read(*loc, &mut buf).unwrap();
            assert_eq!(buf, blocks[i]);
        }
        // A run of consecutive slots reads with one call.
        let mut run = vec![0u8; 3 * 512];
        c.read(locs[1], &mut run).unwrap();
        assert_eq!(&run[512..1024], &blocks[2][..]);
        c.sync().unwrap();
        assert!(c.remove(1).is_err(), "the active container stays");
        c.remove(0).unwrap();
        assert!(c.read(locs[0], &mut vec![0u8; 512]).is_err());
        // Reopened: ids continue past every container, appends start a new one.
        let c = Containers::open(dir, 512, 4 * 512, 0).unwrap();
        let locs = c.append(&refs[..1], &NoIds).unwrap();
        assert_eq!(locs[0], Location { container: 2, slot: 0 });
    }

    #[test]
    fn small_appends_take_the_slots_of_dead_blocks_once_their_death_is_synced() {
        let c = Containers::open(Arc::new(MemContainerDir::default()), 512, 64 * 512, 0).unwrap();
        let blocks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 512]).collect();
        let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
        let locs = c.append(&refs, &NoIds).unwrap();
        c.freed([locs[1]]);
        let next = c.append(&refs[..1], &NoIds).unwrap();
        assert_eq!(next[0].slot, 4, "a death not synced yet: appended");
        let epoch = c.begin_free_sync();
        c.free_synced(epoch);
        let again = c.append(&refs[3..], &NoIds).unwrap();
        assert_eq!(again[0], locs[1], "the dead block's slot");
        let mut buf = vec![0u8; 512];
        c.read(locs[1], &mut buf).unwrap();
        assert_eq!(buf, blocks[3]);
        // Large appends keep their order at the end, and a pause forgets what is known.
        c.freed([locs[2]]);
        let epoch = c.begin_free_sync();
        c.free_synced(epoch);
        let big: Vec<&[u8]> = std::iter::repeat_n(&refs[0][..], REUSE_MAX_BLOCKS + 1).collect();
        assert_eq!(c.append(&big, &NoIds).unwrap()[0].slot, 5);
        {
            let _paused = c.pause_reuse();
            assert_eq!(c.append(&refs[..1], &NoIds).unwrap()[0].slot, 5 + REUSE_MAX_BLOCKS as u32 + 1);
        }
        assert_eq!(c.append(&refs[..1], &NoIds).unwrap()[0].slot, 5 + REUSE_MAX_BLOCKS as u32 + 2);
    }

    #[test]
    fn location_round_trips() {
        let l = Location { container: 7, slot: 65535 };
        assert_eq!(Location::decode(&l.encode()), Some(l));
        assert_eq!(Location::decode(&[1, 2, 3]), None);
    }
}
