//! Compaction: giving back the space of dead blocks.
//!
//! A block whose last reference goes leaves a dead slot in its container (small writes take
//! some of them again, see the containers' `free_slots`; nothing on the write path waits for
//! space to be reclaimed). A pass finds the
//! containers whose live share has fallen below a threshold, copies their live blocks to the
//! container being appended to, points the blocks' `refs` entries at the copies, and deletes
//! the old containers. Crash-safe at every step:
//!
//! 1. copy the live blocks and sync the copies: a crash leaves unreferenced copies (garbage the
//!    next pass reclaims);
//! 2. under each block's fingerprint stripe, point its entry at the copy if it still names the
//!    old slot (a block that died meanwhile is skipped; its copy is garbage): a crash leaves
//!    some entries at the old location and some at the new one, both valid;
//! 3. sync the engine's log, then delete the old containers: no entry names them any more.
//!
//! Map entries keep their location hints; a hint that names a deleted container no longer
//! resolves and the read asks `refs`, so moved blocks cost one more lookup until rewritten.
//! Memory: the live slots of the containers looked at, one bit each (32 KiB per GiB of
//! containers), and at most `MOVE_GROUP_BLOCKS` fingerprints of blocks to move at a time.

use std::collections::{BTreeMap, HashMap};

use super::{CompactionReport, Store};
use crate::container::{Containers, Location};
use crate::engine::{Cf, WriteBatch};
use crate::keys::*;
use crate::{Fingerprint, Result};

/// Where a compaction pass stops early: the state a crash at that point leaves behind, for
/// tests that reopen the store after it (the `test-util` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionStop {
    /// After the live blocks of the first batch are copied and synced, before any entry moves.
    AfterCopy,
    /// After the first batch's entries name the copies, before the rest.
    AfterFirstBatch,
    /// After every entry names the copies and the log is synced, before the old containers go.
    BeforeDelete,
}

/// Live blocks collected per group of containers rewritten together (24 bytes each).
const MOVE_GROUP_BLOCKS: usize = 1 << 20;
/// Blocks moved per engine batch (under their fingerprint stripes).
const MOVE_BATCH: usize = 1024;

impl Store {
    /// One compaction pass: rewrites every container (but the one being appended to) whose live
    /// blocks fill less than `min_live_share` of it (0.0..=1.0; 0.5 is the servers' default),
    /// deleting those left with none. Safe while the store serves I/O; one pass at a time.
    /// Nothing to do when the blocks are in an external pool.
    pub fn compact(&self, min_live_share: f64) -> Result<CompactionReport> {
        self.compact_until(min_live_share, None)
    }

    /// A compaction pass that stops at `stop` as a crash there would (tests only).
    #[cfg(feature = "test-util")]
    pub fn compact_interrupted(&self, min_live_share: f64, stop: CompactionStop) -> Result<CompactionReport> {
        self.compact_until(min_live_share, Some(stop))
    }

    fn compact_until(&self, min_live_share: f64, stop: Option<CompactionStop>) -> Result<CompactionReport> {
        let Some(containers) = self.containers() else { return Ok(CompactionReport::default()) };
        let _pass = self.compaction.lock();
        // No new block may land in a container this pass deletes: dead slots are forgotten and
        // none is taken until it ends (commits that took one before are waited for below).
        let _no_reuse = containers.pause_reuse();
        let bs = u64::from(self.block_size);
        let listed = containers.list()?;
        let active = containers.active_id();
        // Containers that were not being appended to when listed never will be again; wait
        // for commits that appended to them before, so their blocks are counted live.
        drop(self.appends.write());
        let mut report = CompactionReport { bytes_before: listed.iter().map(|(_, _, b)| b).sum(), ..Default::default() };
        // Live slots per container, from one scan of `refs`.
        let mut candidates: BTreeMap<u32, (u64, u64)> =
            listed.iter().filter(|(id, _, _)| Some(*id) != active).map(|&(id, slots, bytes)| (id, (slots, bytes))).collect();
        report.containers_checked = candidates.len() as u64;
        let mut live: HashMap<u32, u64> = HashMap::new();
        // Counts still only journalled would be missed by the scan.
        self.fold_refs()?;
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let (_, v) = kv?;
            if let Some(loc) = parse_ref(&v)?.location {
                if candidates.contains_key(&loc.container) {
                    *live.entry(loc.container).or_default() += 1;
                }
            }
        }
        candidates.retain(|id, (slots, _)| {
            let live = live.get(id).copied().unwrap_or(0);
            *slots == 0 || (live as f64) < min_live_share * (*slots as f64)
        });
        // Groups of containers whose live blocks fit the move bound.
        let mut groups: Vec<Vec<u32>> = Vec::new();
        let mut group_blocks = 0usize;
        for id in candidates.keys() {
            let n = live.get(id).copied().unwrap_or(0) as usize;
            if groups.is_empty() || (group_blocks + n > MOVE_GROUP_BLOCKS && group_blocks > 0) {
                groups.push(Vec::new());
                group_blocks = 0;
            }
            groups.last_mut().expect("a group").push(*id);
            group_blocks += n;
        }
        for group in groups {
            let Some(moved) = self.move_live_blocks(containers, &group, stop)? else { return Ok(report) };
            report.blocks_moved += moved;
            // Every entry names the copies now; make that durable before the old bytes go.
            containers.sync()?;
            self.engine.sync()?;
            if stop == Some(CompactionStop::BeforeDelete) {
                return Ok(report);
            }
            for id in &group {
                containers.remove(*id)?;
                if live.get(id).copied().unwrap_or(0) == 0 {
                    report.containers_deleted += 1;
                } else {
                    report.containers_rewritten += 1;
                }
            }
        }
        report.bytes_after = containers.list()?.iter().map(|(_, _, b)| b).sum();
        if report.containers_rewritten + report.containers_deleted > 0 {
            tracing::info!(?report, reclaimed = report.bytes_before.saturating_sub(report.bytes_after), block_size = bs, "compaction pass");
        }
        Ok(report)
    }

    /// Copies the live blocks of containers `group` and points their entries at the copies.
    /// None: stopped early at `stop`.
    fn move_live_blocks(&self, containers: &Containers, group: &[u32], stop: Option<CompactionStop>) -> Result<Option<u64>> {
        let mut live: Vec<(Fingerprint, Location)> = Vec::new();
        self.fold_refs()?;
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let (k, v) = kv?;
            if let Some(loc) = parse_ref(&v)?.location {
                if group.contains(&loc.container) {
                    live.push((parse_fingerprint(&k)?, loc));
                }
            }
        }
        // In slot order: the copies are read sequentially.
        live.sort_by_key(|(_, loc)| *loc);
        let mut moved = 0u64;
        let mut bytes = vec![0u8; self.block_size as usize * MOVE_BATCH];
        for chunk in live.chunks(MOVE_BATCH) {
            // 1. Copy (outside every lock: until step 2 the copies are garbage).
            let bs = self.block_size as usize;
            for (i, (_, loc)) in chunk.iter().enumerate() {
                containers.read(*loc, &mut bytes[i * bs..(i + 1) * bs])?;
            }
            let blocks: Vec<&[u8]> = bytes[..chunk.len() * bs].chunks(bs).collect();
            let copies = containers.append(&blocks, &super::EngineContainerIds(self.engine.as_ref()))?;
            containers.sync()?;
            if stop == Some(CompactionStop::AfterCopy) {
                return Ok(None);
            }
            // 2. Repoint entries that still name the old slot.
            let mut stripes: Vec<usize> = chunk.iter().map(|(fp, _)| self.fingerprint_stripe(fp)).collect();
            stripes.sort_unstable();
            stripes.dedup();
            let _guards: Vec<_> = stripes.iter().map(|&i| self.fingerprint_stripes[i].lock()).collect();
            let fps: Vec<Fingerprint> = chunk.iter().map(|(fp, _)| *fp).collect();
            let mut changes = Vec::new();
            for (((fp, old), copy), entry) in chunk.iter().zip(&copies).zip(self.ref_entries(&fps)?) {
                if let Some(entry) = entry.filter(|e| e.location == Some(*old)) {
                    changes.push((*fp, Some(RefEntry { count: entry.count, location: Some(*copy) })));
                    moved += 1;
                }
            }
            if !changes.is_empty() {
                let mut batch = WriteBatch::new();
                let staged = self.refs.stage(&mut batch, changes, None);
                self.engine.write(batch)?;
                self.refs.applied(staged);
            }
            if stop == Some(CompactionStop::AfterFirstBatch) {
                return Ok(None);
            }
        }
        Ok(Some(moved))
    }
}
