//! A bounded cache of block map entries for the write path: the old entries a small write
//! looks up before it commits.
//!
//! Why: with the map's changes journalled (see `map_overlay`), a 4 KiB random overwrite still
//! looked its old entry up in `maps`' table files (index block, data block, block cache: a
//! few microseconds, most of what separated the journal from a map kept wholly in memory).
//! VDO keeps a cache of block map pages for the same reason.
//!
//! Rule: an entry in the cache is always the block's current one. Every map change updates
//! the cache when it holds the block ([`MapCache::update`], called where the overlay takes
//! the change, under the block's stripe); entries come in only from lookups made under the
//! blocks' stripes held for writing ([`MapCache::fill`]): a reader without them could put in
//! a value a writer replaced meanwhile.
//!
//! Shape: 4-way set-associative, sets picked by a hash of (disk, block), sharded behind
//! mutexes; a full set gives up its slots in turn. Memory: `entries` slots of 48 bytes (24
//! MiB for the default 512 Ki), each of the 64 shards allocated when its first entry comes in.

use parking_lot::Mutex;

use super::DiskId;
use crate::keys::MapEntry;

const WAYS: usize = 4;
const SHARDS: usize = 64;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The disk's id plus one (0: an empty slot).
    disk: u64,
    block: u64,
    entry: Option<MapEntry>,
}

#[derive(Debug, Default)]
struct Shard {
    /// Empty until the shard's first entry comes in.
    slots: Vec<Slot>,
    /// Per set, the way the next new entry takes when the set is full.
    next_way: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct MapCache {
    shards: Vec<Mutex<Shard>>,
    sets_per_shard: usize,
}

impl MapCache {
    /// A cache of about `entries` map entries (0: none).
    pub(super) fn new(entries: usize) -> MapCache {
        let sets_per_shard = entries / WAYS / SHARDS;
        let shards = (0..if sets_per_shard == 0 { 0 } else { SHARDS }).map(|_| Mutex::new(Shard::default())).collect();
        MapCache { shards, sets_per_shard }
    }

    fn locate(&self, disk: DiskId, block: u64) -> Option<(&Mutex<Shard>, usize)> {
        if self.shards.is_empty() {
            return None;
        }
        // A multiply-xorshift mix: consecutive blocks spread over shards and sets.
        let mut h = disk.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        h ^= h >> 29;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 32;
        let shard = (h % SHARDS as u64) as usize;
        let set = ((h / SHARDS as u64) % self.sets_per_shard as u64) as usize;
        Some((&self.shards[shard], set))
    }

    /// The cached entry of a block: None when not cached; Some(None) for a hole.
    pub(super) fn get(&self, disk: DiskId, block: u64) -> Option<Option<MapEntry>> {
        let (shard, set) = self.locate(disk, block)?;
        let shard = shard.lock();
        shard.slots.get(set * WAYS..(set + 1) * WAYS)?.iter().find(|s| s.disk == disk.0 + 1 && s.block == block).map(|s| s.entry)
    }

    /// A block's entry has changed: the cache takes the new one if it holds the block.
    pub(super) fn update(&self, disk: DiskId, block: u64, entry: Option<MapEntry>) {
        let Some((shard, set)) = self.locate(disk, block) else { return };
        let mut shard = shard.lock();
        let Some(ways) = shard.slots.get_mut(set * WAYS..(set + 1) * WAYS) else { return };
        if let Some(s) = ways.iter_mut().find(|s| s.disk == disk.0 + 1 && s.block == block) {
            s.entry = entry;
        }
    }

    /// A block's current entry, looked up by a caller holding the block's stripe for writing.
    pub(super) fn fill(&self, disk: DiskId, block: u64, entry: Option<MapEntry>) {
        let Some((shard, set)) = self.locate(disk, block) else { return };
        let mut shard = shard.lock();
        let shard = &mut *shard;
        if shard.slots.is_empty() {
            shard.slots = vec![Slot::default(); self.sets_per_shard * WAYS];
            shard.next_way = vec![0; self.sets_per_shard];
        }
        let ways = &mut shard.slots[set * WAYS..(set + 1) * WAYS];
        let way = match ways.iter().position(|s| (s.disk == disk.0 + 1 && s.block == block) || s.disk == 0) {
            Some(way) => way,
            None => {
                let way = shard.next_way[set] as usize;
                shard.next_way[set] = ((way + 1) % WAYS) as u8;
                way
            }
        };
        ways[way] = Slot { disk: disk.0 + 1, block, entry };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fingerprint;

    fn e(n: u8) -> Option<MapEntry> {
        Some(MapEntry { fp: Fingerprint([n; 16]), hint: None })
    }

    #[test]
    fn entries_come_in_by_fill_and_change_by_update_only_when_held() {
        let cache = MapCache::new(1024);
        let d = DiskId(3);
        assert_eq!(cache.get(d, 7), None);
        cache.update(d, 7, e(1));
        assert_eq!(cache.get(d, 7), None, "an update does not bring a block in");
        cache.fill(d, 7, None);
        assert_eq!(cache.get(d, 7), Some(None));
        cache.update(d, 7, e(2));
        assert_eq!(cache.get(d, 7), Some(e(2)));
        assert_eq!(cache.get(DiskId(4), 7), None);
    }

    #[test]
    fn a_full_cache_keeps_at_most_its_size_and_evicts_in_turn() {
        let cache = MapCache::new(4 * 64 * 4);
        let d = DiskId(1);
        for block in 0..10_000 {
            cache.fill(d, block, e((block % 251) as u8));
        }
        let held = (0..10_000).filter(|&b| cache.get(d, b).is_some()).count();
        assert_eq!(held, 4 * 64 * 4, "every slot taken, none more");
        for block in (0..10_000).filter(|&b| cache.get(d, b).is_some()) {
            assert_eq!(cache.get(d, block), Some(e((block % 251) as u8)));
        }
        assert_eq!(MapCache::new(0).get(d, 1), None);
        MapCache::new(0).fill(d, 1, None);
    }
}
