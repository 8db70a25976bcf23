//! The resemblance index: which stored block looks like a given one.
//!
//! Delta against similar blocks (the migration's issue 14) needs, for a block the peer lacks,
//! a block of this store that differs from it by a few bytes. Each super-feature of each
//! stored block's sketch ([`crate::resemblance`]) makes a key of [`Cf::Sketches`]: the
//! super-feature followed by where the block is (its container and slot), so a lookup is
//! three short prefix scans, and a block and its older version, which share super-features,
//! are both found (the caller skips the block itself).
//!
//! The index is built lazily, a container at a time, by [`Store::update_sketches`], never on
//! the write path: a container is sketched once it is sealed (no longer appended to), and a
//! cursor in [`Cf::Meta`] says where the next pass starts. Entries are never updated when
//! blocks die or move: a location names bytes that were a stored block (a dead slot is still
//! a good reference if the peer holds that content: the peer checks by fingerprint), a
//! location whose container compaction deleted fails to read and is skipped, and a dead slot
//! a new block took (small writes reuse them) now holds other bytes: the delta against it is
//! then merely larger, never wrong (a base is named by the fingerprint of the bytes read).
//! Known limitation: a block that a small write stores in a reused slot of a container
//! sketched before is not sketched itself (the cursor has passed that container), so a
//! migration finds fewer delta bases among blocks written by small random writes. Relocated blocks are sketched again in the
//! container they moved to. Entries of deleted containers stay until a rebuild (known
//! limitation: the index grows with the blocks ever sketched, 3 x 17 bytes each).
//!
//! Cost: three keys of 17 bytes per sketched block in the engine; CPU about 3 µs per
//! block (the sketch) plus a sequential read of the container.

use super::Store;
use crate::container::Location;
use crate::engine::{Cf, WriteBatch};
use crate::resemblance::{sketch, Sketch, SUPER_FEATURES};
use crate::Result;

/// In [`Cf::Meta`]: the id of the first container not sketched yet (u32 LE).
const SKETCH_CURSOR_KEY: &[u8] = b"sketch-cursor";
/// Slots read with one `pread` and indexed with one engine batch.
const SKETCH_RUN_SLOTS: u64 = 256;

/// What one [`Store::update_sketches`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SketchReport {
    /// Containers sketched.
    pub containers: u64,
    /// Blocks whose sketch went into the index.
    pub blocks: u64,
    /// Slots with too little variety to sketch (zero-filled, one repeated byte).
    pub unsketchable: u64,
}

/// Locations read per super-feature at most (the oldest first).
const LOCATIONS_PER_FEATURE: usize = 4;

fn feature_prefix(index: usize, super_feature: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = index as u8;
    k[1..].copy_from_slice(&super_feature.to_be_bytes());
    k
}

fn sketch_key(index: usize, super_feature: u64, at: Location) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..9].copy_from_slice(&feature_prefix(index, super_feature));
    k[9..13].copy_from_slice(&at.container.to_be_bytes());
    k[13..].copy_from_slice(&at.slot.to_be_bytes());
    k
}

fn location_of(key: &[u8]) -> Option<Location> {
    let tail: [u8; 8] = key.get(9..17)?.try_into().ok()?;
    Some(Location { container: u32::from_be_bytes(tail[..4].try_into().ok()?), slot: u32::from_be_bytes(tail[4..].try_into().ok()?) })
}

impl Store {
    /// Sketches every sealed container that the index does not cover yet (the container being
    /// appended to waits until it is full or the store reopens). Safe while the store serves
    /// I/O; runs beside no compaction pass. Nothing to do when blocks are in an external pool.
    pub fn update_sketches(&self) -> Result<SketchReport> {
        let mut report = SketchReport::default();
        let Some(containers) = self.containers() else { return Ok(report) };
        let _pass = self.compaction.lock();
        let cursor = match self.engine.get(Cf::Meta, SKETCH_CURSOR_KEY)? {
            Some(v) => u32::from_le_bytes(v.as_slice().try_into().map_err(|_| crate::StoreError::Corrupt("sketch cursor is not 4 bytes".into()))?),
            None => 0,
        };
        let active = containers.active_id();
        let bs = self.block_size as usize;
        let mut buf = Vec::new();
        for (id, slots, _) in containers.list()? {
            if id < cursor || active.is_some_and(|a| id >= a) {
                continue;
            }
            let mut first = 0u64;
            while first < slots {
                let n = SKETCH_RUN_SLOTS.min(slots - first);
                buf.resize(n as usize * bs, 0);
                let at = Location { container: id, slot: first as u32 };
                // Compaction, the only deleter of containers, waits for this pass.
                containers.read(at, &mut buf)?;
                let mut batch = WriteBatch::new();
                for (i, block) in buf.chunks_exact(bs).enumerate() {
                    let loc = Location { container: id, slot: (first + i as u64) as u32 };
                    match sketch(block) {
                        Some(Sketch(supers)) => {
                            report.blocks += 1;
                            for (j, sf) in supers.iter().enumerate() {
                                batch.put(Cf::Sketches, sketch_key(j, *sf, loc).to_vec(), Vec::new());
                            }
                        }
                        None => report.unsketchable += 1,
                    }
                }
                first += n;
                if first >= slots {
                    batch.put(Cf::Meta, SKETCH_CURSOR_KEY.to_vec(), (id + 1).to_le_bytes().to_vec());
                }
                self.engine.write(batch)?;
            }
            report.containers += 1;
        }
        Ok(report)
    }

    /// Locations of indexed blocks that share a super-feature with `sketch`, those sharing
    /// more first, each once. A location may name a dead slot (its bytes are the block they
    /// were, or a new block's once a small write took the slot: check by fingerprint) or a
    /// deleted container ([`Store::read_location`] then fails).
    pub fn similar_blocks(&self, sketch: &Sketch) -> Result<Vec<Location>> {
        let mut found: Vec<(Location, usize)> = Vec::with_capacity(SUPER_FEATURES * LOCATIONS_PER_FEATURE);
        for (j, sf) in sketch.0.iter().enumerate() {
            let start = feature_prefix(j, *sf);
            let end = sketch_key(j, *sf, Location { container: u32::MAX, slot: u32::MAX });
            for kv in self.engine.scan(Cf::Sketches, &start, Some(&end))?.take(LOCATIONS_PER_FEATURE) {
                let Some(loc) = location_of(&kv?.0) else { continue };
                match found.iter_mut().find(|(l, _)| *l == loc) {
                    Some((_, n)) => *n += 1,
                    None => found.push((loc, 1)),
                }
            }
        }
        found.sort_by(|a, b| b.1.cmp(&a.1));
        Ok(found.into_iter().map(|(l, _)| l).collect())
    }

    /// Reads the block bytes at `loc` (one block, `buf` is `block_size` bytes), live or dead.
    pub fn read_location(&self, loc: Location, buf: &mut [u8]) -> Result<()> {
        match self.containers() {
            Some(c) => c.read(loc, buf),
            None => Err(crate::StoreError::InvalidArgument("blocks are in an external pool: no locations".into())),
        }
    }
}
