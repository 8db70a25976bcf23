//! Reading the block map: the journal's overlay (see `map_overlay`) over `maps`. Every reader
//! takes the overlay's entries of its range first, then reads `maps` for the rest.

use std::iter::Peekable;
use std::vec::IntoIter;

use super::{DiskId, Store};
use crate::engine::{Cf, ScanIter};
use crate::keys::*;
use crate::{Result, StoreError};

impl Store {
    /// The map entries at blocks `first..=last` of a disk (None: a hole). One seek for a range;
    /// a point lookup for a single block.
    pub(super) fn map_lookup(&self, disk: DiskId, first: u64, last: u64) -> Result<Vec<Option<MapEntry>>> {
        let overlay = &self.refs.maps;
        if first == last {
            if let Some(entry) = overlay.get(disk, first) {
                return Ok(vec![entry]);
            }
            return self.engine.get(Cf::Maps, &map_key(disk, first))?.map(|v| parse_map_entry(&v)).transpose().map(|e| vec![e]);
        }
        let over = overlay.range(disk, first, last.saturating_add(1), usize::MAX);
        let mut out = vec![None; (last - first + 1) as usize];
        self.engine.for_each_in(Cf::Maps, &map_key(disk, first), &map_key(disk, last + 1), &mut |k, v| {
            let (_, block) = parse_map_key(k)?;
            let slot = block
                .checked_sub(first)
                .and_then(|i| out.get_mut(i as usize))
                .ok_or_else(|| StoreError::Corrupt(format!("map range returned block {block}")))?;
            *slot = Some(parse_map_entry(v)?);
            Ok(())
        })?;
        for (block, entry) in over {
            out[(block - first) as usize] = entry;
        }
        Ok(out)
    }

    /// The map entries of scattered blocks of a disk, in their order (one batched lookup for
    /// those the overlay does not hold).
    pub(super) fn map_lookup_many(&self, disk: DiskId, blocks: &[u64]) -> Result<Vec<Option<MapEntry>>> {
        let over: Vec<Option<Option<MapEntry>>> = blocks.iter().map(|&b| self.refs.maps.get(disk, b)).collect();
        let keys: Vec<_> = blocks.iter().zip(&over).filter(|(_, o)| o.is_none()).map(|(&b, _)| map_key(disk, b)).collect();
        let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        let mut stored = self.engine.multi_get(Cf::Maps, &keys)?.into_iter();
        over.into_iter()
            .map(|o| match o {
                Some(entry) => Ok(entry),
                None => stored.next().flatten().map(|v| parse_map_entry(&v)).transpose(),
            })
            .collect()
    }

    /// The map entries of scattered blocks of a disk, in their order, for a caller that holds
    /// their stripes for writing: from the map cache where it has them, and what is looked up
    /// goes into it.
    pub(super) fn map_lookup_for_write(&self, disk: DiskId, blocks: &[u64]) -> Result<Vec<Option<MapEntry>>> {
        let cache = &self.refs.maps.cache;
        let mut out: Vec<Option<Option<MapEntry>>> = blocks.iter().map(|&b| cache.get(disk, b)).collect();
        let missed: Vec<u64> = blocks.iter().zip(&out).filter(|(_, o)| o.is_none()).map(|(&b, _)| b).collect();
        if !missed.is_empty() {
            let mut looked_up = missed.iter().zip(self.map_lookup_many(disk, &missed)?);
            for slot in out.iter_mut().filter(|o| o.is_none()) {
                let (&block, entry) = looked_up.next().expect("one per miss");
                cache.fill(disk, block, entry);
                *slot = Some(entry);
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every block looked up")).collect())
    }

    /// The map entries of blocks `first..end` of a disk in block order, read as long as the
    /// caller likes. At most `overlay_limit` entries of the overlay are taken: past the last
    /// of them the scan stops early, at [`MapScan::end`].
    pub(super) fn map_scan(&self, disk: DiskId, first: u64, end: u64, overlay_limit: usize) -> Result<MapScan> {
        let over = self.refs.maps.range(disk, first, end, overlay_limit);
        let end = match over.last() {
            Some(&(block, _)) if over.len() == overlay_limit => block + 1,
            _ => end,
        };
        let maps = self.engine.scan(Cf::Maps, &map_key(disk, first), Some(&map_key(disk, end)))?;
        Ok(MapScan { over: over.into_iter().peekable(), maps, next_stored: None, end })
    }
}

/// See [`Store::map_scan`]: (block, entry) in block order.
pub(super) struct MapScan {
    over: Peekable<IntoIter<(u64, Option<MapEntry>)>>,
    maps: ScanIter,
    next_stored: Option<(u64, MapEntry)>,
    end: u64,
}

impl MapScan {
    /// Where the scan ends (before the range's end when the overlay's entries were limited).
    pub(super) fn end(&self) -> u64 {
        self.end
    }

    fn stored(&mut self) -> Result<Option<(u64, MapEntry)>> {
        if self.next_stored.is_none() {
            if let Some(kv) = self.maps.next() {
                let (k, v) = kv?;
                self.next_stored = Some((parse_map_key(&k)?.1, parse_map_entry(&v)?));
            }
        }
        Ok(self.next_stored)
    }
}

impl Iterator for MapScan {
    type Item = Result<(u64, MapEntry)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let stored = match self.stored() {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            let over = self.over.peek().map(|(b, _)| *b);
            match (over, stored) {
                (None, None) => return None,
                (Some(o), s) if s.is_none_or(|(b, _)| o <= b) => {
                    if s.is_some_and(|(b, _)| b == o) {
                        self.next_stored = None;
                    }
                    let (block, entry) = self.over.next().expect("peeked");
                    if let Some(entry) = entry {
                        return Some(Ok((block, entry)));
                    }
                }
                (_, Some(s)) => {
                    self.next_stored = None;
                    return Some(Ok(s));
                }
                (Some(_), None) => unreachable!("matched above"),
            }
        }
    }
}
