//! Accounting (store and disk statistics) and checking (fsck).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use super::{DiskId, DiskStats, FsckReport, Store, StoreStats, POOL_BATCH};
use crate::container::Location;
use crate::engine::{prefix_end, Cf};
use crate::keys::*;
use crate::{Fingerprint, Result};

impl Store {
    pub fn stats(&self) -> Result<StoreStats> {
        let disks = self.list_disks()?;
        let bs = u64::from(self.block_size);
        let mut stored_blocks = 0u64;
        let mut references = 0u64;
        // `refs` with the journal's overlay over it (not folded: metrics ask every few
        // seconds, and each fold adds a table file).
        let mut overlay = self.refs.snapshot();
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let (k, v) = kv?;
            let entry = match overlay.remove(&parse_fingerprint(&k)?) {
                Some(newer) => newer,
                None => Some(parse_ref(&v)?),
            };
            if let Some(entry) = entry {
                stored_blocks += 1;
                references += entry.count;
            }
        }
        for entry in overlay.into_values().flatten() {
            stored_blocks += 1;
            references += entry.count;
        }
        let allocated_bytes = references * bs;
        let stored_bytes = stored_blocks * bs;
        let container_bytes = match self.containers() {
            Some(c) => Some(c.list()?.iter().map(|(_, _, bytes)| bytes).sum::<u64>()),
            None => None,
        };
        let engine_bytes = self.engine.disk_usage_bytes();
        Ok(StoreStats {
            block_size: self.block_size,
            algorithm: self.algorithm,
            disks: disks.len() as u64,
            logical_bytes: disks.iter().map(|d| d.size).sum(),
            allocated_bytes,
            stored_blocks,
            stored_bytes,
            dedupe_ratio: if stored_bytes == 0 { 1.0 } else { allocated_bytes as f64 / stored_bytes as f64 },
            engine_bytes,
            container_bytes,
            reclaimable_bytes: container_bytes.map_or(0, |c| c.saturating_sub(stored_bytes)),
            index_bytes_per_block: engine_bytes.filter(|_| stored_blocks > 0).map(|e| e as f64 / stored_blocks as f64),
            engine_memory: self.engine.memory(),
        })
    }

    pub fn disk_stats(&self, name: &str) -> Result<DiskStats> {
        let info = self.disk(name)?;
        let bs = u64::from(self.block_size);
        let mut local: HashMap<Fingerprint, u64> = HashMap::new();
        let mut allocated = 0u64;
        for entry in self.map_snapshot(info.id)? {
            let (_, fp) = entry?;
            allocated += 1;
            *local.entry(fp).or_default() += 1;
        }
        // In key order: consecutive lookups walk neighbouring parts of RocksDB's memtable
        // skiplist and SST blocks, which stay in the CPU's caches.
        let mut fps: Vec<Fingerprint> = local.keys().copied().collect();
        fps.sort_unstable();
        let mut exclusive = 0u64;
        for chunk in fps.chunks(4096) {
            for (fp, count) in chunk.iter().zip(self.ref_counts(chunk)?) {
                if count == 1 && local[fp] == 1 {
                    exclusive += 1;
                }
            }
        }
        Ok(DiskStats {
            name: info.name,
            size: info.size,
            allocated_bytes: allocated * bs,
            exclusive_bytes: exclusive * bs,
            shared_bytes: (allocated - exclusive) * bs,
        })
    }

    /// Checks that every reference count equals the number of map entries naming it, that
    /// every mapped block is stored, and (with `verify_data`) that every stored block re-hashes
    /// to its fingerprint.
    ///
    /// With local blocks, "stored" means a location inside an existing container, and a map
    /// entry's location hint names the block's location, a container compaction has deleted,
    /// or (a pass interrupted between moving the blocks and deleting their old containers) an
    /// old copy that still holds the block's bytes: counted in `stale_hints`, a problem only
    /// if the bytes there are other ones. With an external pool, "stored" means in the pool,
    /// with exactly one reference of this store on each block it maps; the whole pool is
    /// listed for references of this store on blocks it does not map (leaks, which
    /// [`Store::repair_references`] gives back), and `stored_blocks` and `verified_blocks`
    /// count this store's blocks. Other stores' blocks are theirs to check.
    pub fn fsck(&self, verify_data: bool) -> Result<FsckReport> {
        // No delete, resize or rename runs meanwhile (a delete releases references in many
        // batches; seen half-way it would look like damage), and no compaction pass (which
        // moves blocks). Writes from clients still run: on a busy store, a problem fsck
        // reports may be a write in flight; check it again.
        let _catalog = self.catalog.lock();
        let _compaction = self.compaction.lock();
        // No slot of a block that dies meanwhile takes a new block while it is read back
        // (once the commits that took one already have written their batches).
        let _no_reuse = self.containers().map(|c| c.pause_reuse());
        drop(self.appends.write());
        // The scans of `refs` below see only what is folded into it.
        self.fold_refs()?;
        let mut report = FsckReport::default();
        let disks: HashMap<DiskId, (String, u64)> = {
            let table = self.disks.read();
            table.by_name.iter().map(|(n, s)| (s.id, (n.clone(), s.size.load(Ordering::Acquire)))).collect()
        };
        report.disks = disks.len() as u64;
        let bs = u64::from(self.block_size);
        // Disks being deleted (a delete in progress, or one a crash interrupted) still own
        // their remaining map entries and the references those hold; a copy in progress
        // owns references for the block ranges it has counted only (None: every block).
        let mut deleting: HashMap<DiskId, Option<Vec<(u64, u64)>>> = HashMap::new();
        for (k, v) in self.engine.scan(Cf::Meta, DELETING_PREFIX, prefix_end(DELETING_PREFIX).as_deref())?.filter_map(|kv| kv.ok()) {
            let Some(id) = <[u8; 8]>::try_from(&k[DELETING_PREFIX.len()..]).ok().map(|b| DiskId(u64::from_be_bytes(b))) else { continue };
            deleting.insert(id, if v.is_empty() { None } else { Some(self.counted_ranges(id)?) });
        }
        let containers = self.containers();
        // Per fingerprint: map entries naming it, and the first hint of one that names a
        // container that still exists; other such hints (old copies a crash left) apart.
        let mut expected: HashMap<Fingerprint, (u64, Option<Location>)> = HashMap::new();
        let mut other_hints: HashMap<Fingerprint, Vec<Location>> = HashMap::new();
        for kv in self.engine.scan(Cf::Maps, b"", None)? {
            let (k, v) = kv?;
            report.map_entries += 1;
            let (disk, block) = parse_map_key(&k)?;
            let entry = parse_map_entry(&v)?;
            match disks.get(&disk) {
                None => match deleting.get(&disk) {
                    // A copy in progress: an entry of a range not counted yet holds no reference.
                    Some(Some(counted)) if !counted.iter().any(|&(first, end)| (first..end).contains(&block)) => continue,
                    Some(_) => {}
                    None => report.problem(format!("map entry of unknown disk #{} block {block}", disk.0)),
                },
                Some((name, size)) if block >= size.div_ceil(bs) => report.problem(format!("disk {name:?}: block {block} is past the end")),
                Some(_) => {}
            }
            let e = expected.entry(entry.fp).or_default();
            e.0 += 1;
            let live_hint = entry.hint.filter(|h| containers.is_some_and(|c| c.get(h.container).is_some()));
            match (e.1, live_hint) {
                (None, Some(h)) => e.1 = Some(h),
                (Some(seen), Some(h)) if seen != h => {
                    let others = other_hints.entry(entry.fp).or_default();
                    if !others.contains(&h) {
                        others.push(h);
                    }
                }
                _ => {}
            }
        }
        let mut verify = vec![0u8; bs as usize];
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let (k, v) = kv?;
            let fp = parse_fingerprint(&k)?;
            let entry = parse_ref(&v)?;
            let (want, hint) = expected.remove(&fp).unwrap_or((0, None));
            if entry.count != want {
                report.problem(format!("block {fp}: reference count {}, but {want} map entries", entry.count));
            }
            let Some(containers) = containers else { continue };
            report.stored_blocks += 1;
            let Some(loc) = entry.location else {
                report.problem(format!("block {fp} has no location"));
                continue;
            };
            let stale = hint.into_iter().chain(other_hints.remove(&fp).unwrap_or_default()).filter(|h| *h != loc);
            for h in stale {
                // Reads take the hint while its container exists: its bytes must be this block's.
                let holds_block = containers
                    .get(h.container)
                    .is_some_and(|f| f.read_at(&mut verify, u64::from(h.slot) * bs).is_ok() && self.algorithm.fingerprint(&verify) == fp);
                if holds_block {
                    report.stale_hints += 1;
                } else {
                    report.problem(format!("block {fp}: a map entry names {h}, which holds other bytes (the block is at {loc})"));
                }
            }
            let Some(file) = containers.get(loc.container) else {
                report.problem(format!("block {fp} is at {loc}, but container {} does not exist", loc.container));
                continue;
            };
            let end = (u64::from(loc.slot) + 1) * bs;
            if file.len()? < end {
                report.problem(format!("block {fp} is at {loc}, past the end of its container"));
                continue;
            }
            if verify_data {
                report.verified_blocks += 1;
                file.read_at(&mut verify, u64::from(loc.slot) * bs)?;
                if self.algorithm.fingerprint(&verify) != fp {
                    report.problem(format!("block {fp} at {loc}: content does not hash to its fingerprint"));
                }
            }
        }
        for (fp, (want, _)) in expected {
            report.problem(format!("block {fp}: {want} map entries but no reference count"));
        }
        if self.external_pool().is_some() {
            self.fsck_pool(verify_data, &mut report)?;
        }
        Ok(report)
    }
}

impl Store {
    /// fsck's half for an external pool: this store's references against the pool's.
    fn fsck_pool(&self, verify_data: bool, report: &mut FsckReport) -> Result<()> {
        let Some(pool) = self.external_pool() else { return Ok(()) };
        let bs = self.block_size as usize;
        let mut mine: HashSet<Fingerprint> = HashSet::new();
        let mut chunk: Vec<Fingerprint> = Vec::with_capacity(POOL_BATCH);
        let check = |chunk: &mut Vec<Fingerprint>, report: &mut FsckReport| -> Result<()> {
            if chunk.is_empty() {
                return Ok(());
            }
            let refs = pool.holder_refs(&self.holder, chunk)?;
            for (fp, refs) in chunk.iter().zip(&refs) {
                match refs {
                    None => report.problem(format!("block {fp} is mapped but missing from the pool {}", pool.location())),
                    Some(0) => report.problem(format!(
                        "block {fp}: the pool holds no reference of this store on it (another store's delete could free it; repair takes it again)"
                    )),
                    Some(1) => {}
                    Some(n) => report.problem(format!("block {fp}: this store holds {n} references in the pool, not 1 (leaked; repair gives them back)")),
                }
                if refs.is_some() {
                    report.stored_blocks += 1;
                }
            }
            if verify_data {
                let datas = pool.get_many(chunk)?;
                for (fp, data) in chunk.iter().zip(datas) {
                    let Some(data) = data else { continue };
                    report.verified_blocks += 1;
                    if data.len() != bs {
                        report.problem(format!("block {fp} has {} bytes, not {bs}", data.len()));
                    }
                    if self.algorithm.fingerprint(&data) != *fp {
                        report.problem(format!("block {fp}: content does not hash to its fingerprint"));
                    }
                }
            }
            chunk.clear();
            Ok(())
        };
        for kv in self.engine.scan(Cf::Refs, b"", None)? {
            let fp = parse_fingerprint(&kv?.0)?;
            mine.insert(fp);
            chunk.push(fp);
            if chunk.len() == POOL_BATCH {
                check(&mut chunk, report)?;
            }
        }
        check(&mut chunk, report)?;
        for block in pool.scan(&self.holder)? {
            let block = block?;
            if block.holder_refs > 0 && !mine.contains(&block.fingerprint) {
                report.problem(format!(
                    "block {}: {} leaked reference(s) of this store in the pool (repair gives them back)",
                    block.fingerprint, block.holder_refs
                ));
            }
        }
        for fp in self.pending_intents()? {
            report.problem(format!("block {fp}: a pool operation was interrupted (repair or the next open finishes it)"));
        }
        Ok(())
    }
}
