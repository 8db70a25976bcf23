//! The block map's side of the store's journal (see `refs_log`): a commit's map changes go as
//! a record under the same sequence number as its reference changes, in the same batch, and
//! to an overlay in memory that every map lookup asks first; a fold writes them into `maps`
//! as one sorted table file with the counts.
//!
//! Why: a map change used to be a random-key insert into `maps`' 64 MiB skiplist (`perf`: the
//! largest single symbol of a 4 KiB random write), then a flush and compactions. With the map
//! out of RocksDB's write path altogether (an experiment that kept it in memory only), 4 KiB
//! random writes of unique data at QD32 cost 27-28 us of server CPU each instead of 39-40
//! (README, Measured: the block map out of the write path).
//!
//! Reads see the overlay over `maps`: a reader copies the overlay's entries of its range
//! *before* it reads `maps`. A fold links its table file into `maps` before it drops the
//! entries it wrote from the overlay, so whatever the reader does not find in its copy,
//! `maps` holds in a value at least as new as the one current when the copy was taken.
//!
//! Memory: the overlay is folded with the counts' overlay (at most `FOLD_HARD_CAP` entries
//! each); an entry is about 80 bytes in the tree (key 16, entry 28, sequence 8, the tree's
//! slack), so at most about 40 MiB, usually about 10 (at `FOLD_AT`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;

use super::map_cache::MapCache;
use super::DiskId;
use crate::keys::{encode_map_entry, parse_map_entry, MapEntry};
use crate::{Result, StoreError};

/// Prefix of a map record's key in `meta` (then the sequence number it shares with the
/// reference record of the same commit, u64 BE).
pub(crate) const MAPS_LOG_PREFIX: &[u8] = b"maps-log/";

/// One commit's map changes: per block of one disk, the new entry (None: a hole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MapChanges {
    pub(super) disk: DiskId,
    pub(super) changes: Vec<(u64, Option<MapEntry>)>,
}

impl MapChanges {
    pub(super) fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// A record: the disk (u64 BE), then per change the block (u64 BE), the value's length (0: a
/// hole) and the value as `maps` holds it.
pub(super) fn encode_record(c: &MapChanges) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + c.changes.len() * 33);
    v.extend_from_slice(&c.disk.0.to_be_bytes());
    for (block, entry) in &c.changes {
        v.extend_from_slice(&block.to_be_bytes());
        match entry {
            None => v.push(0),
            Some(e) => {
                let value = encode_map_entry(*e);
                v.push(value.len() as u8);
                v.extend_from_slice(&value);
            }
        }
    }
    v
}

pub(super) fn decode_record(bytes: &[u8]) -> Result<MapChanges> {
    let bad = || StoreError::Corrupt("map journal record truncated".into());
    let u64_at = |b: &[u8]| b.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(bad);
    let disk = DiskId(u64_at(bytes)?);
    let mut rest = &bytes[8..];
    let mut changes = Vec::new();
    while !rest.is_empty() {
        let block = u64_at(rest)?;
        let len = *rest.get(8).ok_or_else(bad)? as usize;
        let value = rest.get(9..9 + len).ok_or_else(bad)?;
        changes.push((block, if len == 0 { None } else { Some(parse_map_entry(value)?) }));
        rest = &rest[9 + len..];
    }
    Ok(MapChanges { disk, changes })
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) entry: Option<MapEntry>,
    pub(super) seq: u64,
}

/// Map changes journalled and not yet folded into `maps`, by (disk, block): the order of
/// `maps`' keys.
#[derive(Debug)]
pub(super) struct MapOverlay {
    entries: RwLock<BTreeMap<(u64, u64), Pending>>,
    len: AtomicUsize,
    /// Current entries of blocks the write path looked up (see `map_cache`): every change
    /// the overlay takes goes there too.
    pub(super) cache: MapCache,
}

impl MapOverlay {
    pub(super) fn new(cache_entries: usize) -> MapOverlay {
        MapOverlay { entries: RwLock::default(), len: AtomicUsize::new(0), cache: MapCache::new(cache_entries) }
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// A commit's changes, once its batch is written (the caller holds the blocks' stripes).
    pub(super) fn apply(&self, seq: u64, changes: &MapChanges) {
        let mut entries = self.entries.write();
        for (block, entry) in &changes.changes {
            entries.insert((changes.disk.0, *block), Pending { entry: *entry, seq });
            self.cache.update(changes.disk, *block, *entry);
        }
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    /// The overlay's entry of one block: None when `maps` holds the current one; Some(None)
    /// for a hole.
    pub(super) fn get(&self, disk: DiskId, block: u64) -> Option<Option<MapEntry>> {
        if self.len() == 0 {
            return None;
        }
        self.entries.read().get(&(disk.0, block)).map(|p| p.entry)
    }

    /// The overlay's entries of blocks `first..end` of a disk, in block order, at most
    /// `limit` of them.
    pub(super) fn range(&self, disk: DiskId, first: u64, end: u64, limit: usize) -> Vec<(u64, Option<MapEntry>)> {
        if self.len() == 0 || first >= end {
            return Vec::new();
        }
        self.entries.read().range((disk.0, first)..(disk.0, end)).take(limit).map(|(&(_, block), p)| (block, p.entry)).collect()
    }

    /// Every entry, in key order (for a fold).
    pub(super) fn collect(&self) -> Vec<((u64, u64), Pending)> {
        self.entries.read().iter().map(|(k, p)| (*k, *p)).collect()
    }

    /// Drops the entries a fold wrote whose records it deleted (below `watermark`), unless they
    /// changed since. Returns how many went.
    pub(super) fn remove_folded(&self, folded: &[((u64, u64), Pending)], watermark: u64) -> usize {
        let mut removed = 0;
        // A few thousand at a time: commits and readers wait for the lock meanwhile.
        for chunk in folded.chunks(4096) {
            let mut entries = self.entries.write();
            for (key, p) in chunk {
                if p.seq < watermark && entries.get(key).is_some_and(|now| now.seq == p.seq) {
                    entries.remove(key);
                    removed += 1;
                }
            }
            self.len.store(entries.len(), Ordering::Relaxed);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::Location;
    use crate::Fingerprint;

    fn e(n: u8) -> MapEntry {
        MapEntry { fp: Fingerprint([n; 16]), hint: Some(Location { container: 1, slot: u32::from(n) }) }
    }

    #[test]
    fn records_round_trip_and_truncation_is_an_error() {
        let c =
            MapChanges { disk: DiskId(7), changes: vec![(3, Some(e(1))), (9, None), (u64::MAX - 1, Some(MapEntry { fp: Fingerprint([2; 16]), hint: None }))] };
        let bytes = encode_record(&c);
        assert_eq!(decode_record(&bytes).unwrap(), c);
        for cut in 0..bytes.len() {
            if let Ok(d) = decode_record(&bytes[..cut]) {
                // Only whole changes decode: a cut between two of them.
                assert!(d.changes.len() < c.changes.len() && c.changes.starts_with(&d.changes), "cut at {cut}");
            }
        }
    }

    #[test]
    fn folded_entries_leave_unless_they_changed_or_their_record_stays() {
        let overlay = MapOverlay::new(0);
        let d = DiskId(1);
        overlay.apply(1, &MapChanges { disk: d, changes: vec![(0, Some(e(1))), (1, Some(e(2)))] });
        overlay.apply(2, &MapChanges { disk: d, changes: vec![(2, None)] });
        let folded = overlay.collect();
        overlay.apply(3, &MapChanges { disk: d, changes: vec![(1, Some(e(3)))] });
        // Records below 2 deleted: block 0 goes; block 1 changed since; block 2's record stays.
        assert_eq!(overlay.remove_folded(&folded, 2), 1);
        assert_eq!(overlay.get(d, 0), None);
        assert_eq!(overlay.get(d, 1), Some(Some(e(3))));
        assert_eq!(overlay.get(d, 2), Some(None));
        assert_eq!(overlay.range(d, 0, 10, 10), vec![(1, Some(e(3))), (2, None)]);
        assert_eq!(overlay.range(DiskId(2), 0, 10, 10), vec![]);
        assert_eq!(overlay.len(), 2);
    }
}
