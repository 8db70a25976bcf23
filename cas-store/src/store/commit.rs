//! Committing map changes with their reference counts, and keeping an external pool's
//! references in line with them (intents, reconcile, repair).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::map_overlay::MapChanges;
use super::refs_log::{RefChange, FOLD_HARD_CAP};
use super::{is_zero, Blocks, DiskState, EngineContainerIds, RepairReport, Store, Target, POOL_BATCH};
use crate::container::Location;
use crate::engine::{prefix_end, Cf, WriteBatch};
use crate::keys::*;
use crate::pool::{Claim, Claimed};
use crate::{Fingerprint, FingerprintMap, Result, StoreError};

impl Store {
    pub(super) fn target_for<'a>(&self, bytes: Cow<'a, [u8]>) -> Target<'a> {
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
    pub(super) fn plan<'u, 'a: 'u>(
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
    /// Local blocks: new blocks are appended to a container, then one batch holds the map
    /// changes and the counts with their locations; a block whose count reaches zero leaves a
    /// dead slot that compaction reclaims. External pool: intents are recorded, new blocks are
    /// claimed in the pool, the batch (maps, counts, intents of the releases to come) is
    /// committed, then blocks whose count reached zero are released and their intents
    /// cleared; all under the fingerprint stripes, so no other writer of this store claims or
    /// releases the same block meanwhile.
    pub(super) fn commit(&self, state: &DiskState, updates: Vec<(u64, Target<'_>)>, old: &[Option<Fingerprint>]) -> Result<Vec<bool>> {
        let first_plan = Self::plan(updates.iter().map(|(_, t)| t).zip(old)).map_err(|fp| self.collision(fp))?;
        if first_plan.is_empty() {
            return Ok(vec![true; updates.len()]);
        }
        if self.refs.pending() >= FOLD_HARD_CAP {
            // The fold thread is behind: fold here rather than let the overlay grow.
            self.fold_refs()?;
        }

        let mut fp_stripes: Vec<usize> = first_plan.keys().map(|fp| self.fingerprint_stripe(fp)).collect();
        fp_stripes.sort_unstable();
        fp_stripes.dedup();
        let _fp_guards: Vec<_> = fp_stripes.iter().map(|&i| self.fingerprint_stripes[i].lock()).collect();

        let fps: Vec<Fingerprint> = first_plan.keys().copied().collect();
        let entries: FingerprintMap<Option<RefEntry>> = fps.iter().copied().zip(self.ref_entries(&fps)?).collect();
        let count = |fp: &Fingerprint| entries[fp].map_or(0, |e| e.count);
        // Where each block is (local blocks): stored ones from their entries, new ones below.
        let mut locations: FingerprintMap<Location> = entries.iter().filter_map(|(fp, e)| Some((*fp, e.as_ref()?.location?))).collect();

        // A fingerprint this store holds already: compare bytes before sharing the block.
        let to_verify: Vec<(Fingerprint, &[u8])> = first_plan
            .iter()
            .filter_map(|(fp, (_, bytes))| match bytes {
                Some(bytes) if count(fp) > 0 => Some((*fp, *bytes)),
                _ => None,
            })
            .collect();
        if !to_verify.is_empty() {
            self.verify_same_bytes(&to_verify, &locations)?;
        }

        // Blocks new to this store: append them (local) or claim them in the pool.
        let claims: Vec<(Fingerprint, Claim<'_>)> = first_plan
            .iter()
            .filter(|(fp, (delta, _))| count(fp) == 0 && *delta > 0)
            .map(|(fp, (_, bytes))| (*fp, bytes.map_or(Claim::Existing, Claim::Data)))
            .collect();
        let claim_fps: Vec<Fingerprint> = claims.iter().map(|(fp, _)| *fp).collect();
        let mut taken: Vec<Fingerprint> = Vec::new();
        let mut missing: HashSet<Fingerprint> = HashSet::new();
        // A map change per update, a journal record, and intents on an external pool.
        let mut batch = WriteBatch::with_capacity(updates.len() + 1);
        // Held from the append to the batch that names the new slots: compaction waits for
        // these before it counts a container's live blocks.
        let _appending = matches!(self.blocks, Blocks::Local(_)).then(|| self.appends.read());
        match &self.blocks {
            Blocks::Local(containers) => {
                let mut new: Vec<(Fingerprint, &[u8])> = Vec::new();
                for (fp, claim) in &claims {
                    match claim {
                        Claim::Data(bytes) => new.push((*fp, bytes)),
                        // Not stored here: an `Existing` target is skipped.
                        Claim::Existing => {
                            missing.insert(*fp);
                        }
                    }
                }
                if !new.is_empty() {
                    // In the order of the disk's blocks, not of their fingerprints (the
                    // plan's order): a sequential read of what one write stored then finds
                    // it in consecutive slots and reads each run with one `pread`.
                    if new.len() > 1 {
                        let first_use: FingerprintMap<usize> = updates
                            .iter()
                            .enumerate()
                            .rev()
                            .filter_map(|(i, (_, t))| match t {
                                Target::Data { fp, .. } => Some((*fp, i)),
                                _ => None,
                            })
                            .collect();
                        new.sort_unstable_by_key(|(fp, _)| first_use.get(fp).copied().unwrap_or(usize::MAX));
                    }
                    let bytes: Vec<&[u8]> = new.iter().map(|(_, b)| *b).collect();
                    let locs = containers.append(&bytes, &EngineContainerIds(self.engine.as_ref()))?;
                    locations.extend(new.iter().map(|(fp, _)| *fp).zip(locs));
                }
            }
            Blocks::External(pool) => {
                if !claims.is_empty() {
                    let mut intents = WriteBatch::new();
                    for fp in &claim_fps {
                        intents.put(Cf::Meta, pending_key(fp), Vec::new());
                    }
                    self.engine.write(intents)?;
                    let claimed = pool.acquire(&self.holder, &claims)?;
                    let mut collided = None;
                    for (fp, outcome) in claim_fps.iter().zip(&claimed) {
                        match outcome {
                            Claimed::Yes => taken.push(*fp),
                            Claimed::Missing => {
                                missing.insert(*fp);
                            }
                            Claimed::Collision => collided = Some(*fp),
                        }
                    }
                    if let Some(fp) = collided {
                        self.give_back(&taken, &claim_fps);
                        return Err(self.collision(fp));
                    }
                }
            }
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

        let external = self.external_pool().is_some();
        let mut releases: Vec<Fingerprint> = Vec::new();
        let mut ref_changes: Vec<RefChange> = Vec::new();
        for (fp, (delta, _)) in &deltas {
            let before = count(fp);
            let new = i128::from(before) + i128::from(*delta);
            if new < 0 {
                self.give_back(&taken, &claim_fps);
                return Err(StoreError::Corrupt(format!("reference count of {fp} would fall below zero")));
            }
            let new = new as u64;
            if new == before {
                continue;
            }
            if new == 0 {
                ref_changes.push((*fp, None));
                releases.push(*fp);
            } else {
                let location =
                    if external { None } else { Some(*locations.get(fp).ok_or_else(|| StoreError::Corrupt(format!("block {fp} has no location")))?) };
                ref_changes.push((*fp, Some(RefEntry { count: new, location })));
            }
        }
        if external {
            for fp in &claim_fps {
                batch.delete(Cf::Meta, pending_key(fp));
            }
            for fp in &releases {
                batch.put(Cf::Meta, pending_key(fp), Vec::new());
            }
        }

        let mut changed = Vec::new();
        // The map changes go to the journal too (see `map_overlay`), not to `maps`.
        let mut map_changes = MapChanges { disk: state.id, changes: Vec::with_capacity(updates.len()) };
        for (((block, target), old_fp), _) in updates.iter().zip(old).zip(&applied).filter(|(_, &a)| a) {
            let new_fp = match target {
                Target::Zero => None,
                Target::Data { fp, .. } | Target::Existing(fp) => Some(*fp),
            };
            if new_fp == *old_fp {
                continue;
            }
            map_changes.changes.push((*block, new_fp.map(|fp| MapEntry { fp, hint: locations.get(&fp).copied() })));
            changed.push(*block);
        }
        if batch.is_empty() && ref_changes.is_empty() && map_changes.is_empty() {
            return Ok(applied);
        }
        // The counts and the map changes go to the journal in this batch, and to the overlays
        // once it is written (still under the fingerprint and block stripes); a fold moves them
        // into `refs` and `maps` later.
        let staged = (!ref_changes.is_empty() || !map_changes.is_empty()).then(|| self.refs.stage(&mut batch, ref_changes, Some(map_changes)));
        if let Err(e) = self.engine.write(batch) {
            self.give_back(&taken, &claim_fps);
            return Err(e);
        }
        if let Some(staged) = staged {
            self.refs.applied(staged);
        }
        if let (Some(containers), true) = (self.containers(), self.reuse_dead_slots) {
            // Their slots may hold new blocks once this batch is durable.
            containers.freed(releases.iter().filter_map(|fp| entries.get(fp).copied().flatten().and_then(|e| e.location)));
        }
        if let Some(pool) = self.external_pool() {
            // New blocks are likely read soon (a guest reads what it wrote); fetching them back
            // from the pool would cost a round trip.
            for fp in &taken {
                if let Some(bytes) = deltas.get(fp).and_then(|(_, b)| *b) {
                    self.cache.insert(*fp, Arc::from(bytes));
                }
            }
            if !releases.is_empty() {
                match pool.release(&self.holder, &releases) {
                    Ok(()) => self.clear_intents(&releases),
                    Err(e) => tracing::warn!(
                        error = %e,
                        blocks = releases.len(),
                        "releasing references in the block pool failed; they stay recorded and the next open or repair gives them back"
                    ),
                }
            }
            for fp in &releases {
                self.cache.remove(fp);
            }
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

    /// Refuses a write whose blocks share a fingerprint with stored blocks of other bytes.
    fn verify_same_bytes(&self, blocks: &[(Fingerprint, &[u8])], locations: &FingerprintMap<Location>) -> Result<()> {
        match self.containers() {
            Some(containers) => {
                let mut stored = vec![0u8; self.block_size as usize];
                for (fp, bytes) in blocks {
                    let loc = locations.get(fp).ok_or_else(|| StoreError::Corrupt(format!("block {fp} has no location")))?;
                    containers.read(*loc, &mut stored)?;
                    if stored != *bytes {
                        return Err(self.collision(*fp));
                    }
                }
            }
            None => {
                let stored = self.load_blocks(&blocks.iter().map(|(fp, _)| Some(*fp)).collect::<Vec<_>>())?;
                for ((fp, bytes), stored) in blocks.iter().zip(stored) {
                    if stored.as_deref() != Some(*bytes) {
                        return Err(self.collision(*fp));
                    }
                }
            }
        }
        Ok(())
    }

    /// After a failed commit on an external pool: gives back the references this commit took
    /// and clears the intents of its claims. What cannot be given back stays recorded.
    fn give_back(&self, taken: &[Fingerprint], claimed: &[Fingerprint]) {
        let Some(pool) = self.external_pool() else { return };
        if claimed.is_empty() {
            return;
        }
        let released = taken.is_empty() || pool.release(&self.holder, taken).is_ok();
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
    pub(super) fn pending_intents(&self) -> Result<Vec<Fingerprint>> {
        self.engine
            .scan(Cf::Meta, PENDING_PREFIX, prefix_end(PENDING_PREFIX).as_deref())?
            .map(|kv| {
                let (key, _) = kv?;
                key.get(PENDING_PREFIX.len()..).and_then(Fingerprint::from_slice).ok_or_else(|| StoreError::Corrupt("bad block pool intent".into()))
            })
            .collect()
    }

    /// Reconciles the intents left by a crash (at open).
    pub(super) fn reconcile_intents(&self) -> Result<()> {
        if self.external_pool().is_none() {
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
        let Some(pool) = self.external_pool() else { return Ok(RepairReport::default()) };
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
            let have = pool.holder_refs(&self.holder, chunk)?;
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
                pool.release(&self.holder, &extra)?;
                report.released += extra.len() as u64;
            }
            if !retake.is_empty() {
                for outcome in pool.acquire(&self.holder, &retake)? {
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
    /// recorded (a reply lost after the pool applied it). Nothing to do with local blocks.
    /// Safe while the store serves I/O.
    pub fn repair_references(&self, scan_pool: bool) -> Result<RepairReport> {
        let Some(pool) = self.external_pool() else { return Ok(RepairReport::default()) };
        let mut candidates = self.pending_intents()?;
        if scan_pool {
            for block in pool.scan(&self.holder)? {
                let block = block?;
                if block.holder_refs > 0 {
                    candidates.push(block.fingerprint);
                }
            }
            self.fold_refs()?;
            for kv in self.engine.scan(Cf::Refs, b"", None)? {
                candidates.push(parse_fingerprint(&kv?.0)?);
            }
        }
        self.reconcile(&candidates)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreOptions};

    #[test]
    fn a_sequential_write_of_new_blocks_lands_in_consecutive_slots_in_block_order() {
        let store = Store::open_in_memory(StoreOptions::default()).unwrap();
        let vm = store.create_disk("vm", 4 << 20).unwrap();
        let bs = store.block_size() as usize;
        // 200 distinct blocks: their fingerprints' order has nothing to do with theirs.
        let data: Vec<u8> = (0..200 * bs).map(|i| ((i / bs) as u8).wrapping_mul(37) ^ (i / bs / 256) as u8 ^ (i % 7) as u8).collect();
        store.write(vm.id, 0, &data, false).unwrap();
        let entries = store.map_lookup(vm.id, 0, 199).unwrap();
        let slots: Vec<(u32, u32)> = entries.iter().map(|e| e.unwrap().hint.map(|l| (l.container, l.slot)).expect("a location")).collect();
        for pair in slots.windows(2) {
            assert_eq!((pair[1].0, pair[1].1), (pair[0].0, pair[0].1 + 1), "block order: {slots:?}");
        }
        let mut back = vec![0u8; data.len()];
        store.read(vm.id, 0, &mut back).unwrap();
        assert!(back == data);
    }
}
