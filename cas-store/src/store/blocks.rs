//! Block bytes: reference entries and locations, and reading blocks from the
//! containers (straight into the caller's buffer) or from an external pool (through the
//! hot-block cache).

use std::sync::Arc;

use super::{Store, FINGERPRINT_STRIPES, SCAN_BLOCKS};
use crate::container::{ContainerFile, Containers, Location};
use crate::engine::Cf;
use crate::keys::*;
use crate::{Fingerprint, Result, StoreError};

/// A block's bytes as a read of an external pool gets them: from the hot-block cache, or
/// straight from the pool.
enum BlockBytes {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BlockBytes::Shared(b) => b,
            BlockBytes::Owned(b) => b,
        }
    }
}

/// A block resolved to the open container that holds it.
struct Resolved {
    file: Arc<dyn ContainerFile>,
    loc: Location,
}

/// Times a read resolves a block whose container went away meanwhile (compaction moved it)
/// before it gives up.
const RESOLVE_ATTEMPTS: usize = 4;

impl Store {
    pub(super) fn collision(&self, fp: Fingerprint) -> StoreError {
        tracing::error!(fingerprint = %fp, algorithm = %self.algorithm, "fingerprint collision: two different blocks share a fingerprint; write refused");
        StoreError::Collision(fp)
    }

    pub(super) fn fingerprint_stripe(&self, fp: &Fingerprint) -> usize {
        u32::from_le_bytes([fp.0[0], fp.0[1], fp.0[2], fp.0[3]]) as usize % FINGERPRINT_STRIPES
    }

    /// The `refs` entries of `fps` (None: not stored by this store).
    pub(super) fn ref_entries(&self, fps: &[Fingerprint]) -> Result<Vec<Option<RefEntry>>> {
        self.overlay_then_refs(fps, |e| e, |keys| self.engine.multi_get(Cf::Refs, keys)?.into_iter().map(|v| v.map(|v| parse_ref(&v)).transpose()).collect())
    }

    /// Per fingerprint, what the journal's overlay says (see `refs_log`), or else what
    /// `stored` says of `refs` for the rest, asked in one batch (all of them when the overlay
    /// is empty, as it is on a store nothing writes to).
    pub(super) fn overlay_then_refs<T>(
        &self,
        fps: &[Fingerprint],
        from_overlay: impl Fn(Option<RefEntry>) -> T,
        stored: impl FnOnce(&[&[u8]]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        if self.refs.len() == 0 {
            return stored(&fps.iter().map(|fp| &fp.0[..]).collect::<Vec<_>>());
        }
        let overlay: Vec<Option<Option<RefEntry>>> = fps.iter().map(|fp| self.refs.lookup(fp)).collect();
        let keys: Vec<&[u8]> = fps.iter().zip(&overlay).filter(|(_, o)| o.is_none()).map(|(fp, _)| &fp.0[..]).collect();
        let mut stored = stored(&keys)?.into_iter();
        Ok(overlay.into_iter().map(|o| o.map_or_else(|| stored.next().expect("one answer per key"), &from_overlay)).collect())
    }

    /// Writes every reference change still only journalled into `refs`: before a scan of
    /// `refs` (fsck, compaction, repair), which would not see them.
    pub(super) fn fold_refs(&self) -> Result<()> {
        self.refs.fold(self.engine.as_ref(), self.containers()).map(drop)
    }

    pub(super) fn ref_counts(&self, fps: &[Fingerprint]) -> Result<Vec<u64>> {
        Ok(self.ref_entries(fps)?.into_iter().map(|e| e.map_or(0, |e| e.count)).collect())
    }

    pub(super) fn load_block(&self, fp: &Fingerprint) -> Result<Arc<[u8]>> {
        self.load_blocks(&[Some(*fp)])?.pop().flatten().ok_or_else(|| self.missing_block(fp))
    }

    pub(super) fn missing_block(&self, fp: &Fingerprint) -> StoreError {
        StoreError::Corrupt(format!("block {fp} is mapped but not stored"))
    }

    /// Loads the blocks of `fps` (None stays None) in one batch; a block that is not stored is
    /// an error (it is mapped).
    pub(super) fn load_blocks(&self, fps: &[Option<Fingerprint>]) -> Result<Vec<Option<Arc<[u8]>>>> {
        let fetched = self.fetch_blocks(fps)?;
        for (fp, data) in fps.iter().zip(&fetched) {
            if let (Some(fp), None) = (fp, data) {
                return Err(self.missing_block(fp));
            }
        }
        Ok(fetched)
    }

    /// Resolves blocks to their containers: by the map entry's hint when its container still
    /// exists, else by the block's `refs` entry (one batched lookup). None: not stored.
    fn resolve(&self, containers: &Containers, wanted: &[(Fingerprint, Option<Location>)]) -> Result<Vec<Option<Resolved>>> {
        let mut out: Vec<Option<Resolved>> = Vec::with_capacity(wanted.len());
        let mut lookups: Vec<usize> = Vec::new();
        for (i, (_, hint)) in wanted.iter().enumerate() {
            match hint.and_then(|loc| containers.get(loc.container).map(|file| Resolved { file, loc })) {
                Some(r) => out.push(Some(r)),
                None => {
                    out.push(None);
                    lookups.push(i);
                }
            }
        }
        for _ in 0..RESOLVE_ATTEMPTS {
            if lookups.is_empty() {
                break;
            }
            let fps: Vec<Fingerprint> = lookups.iter().map(|&i| wanted[i].0).collect();
            let entries = self.ref_entries(&fps)?;
            let mut again = Vec::new();
            for (&i, entry) in lookups.iter().zip(entries) {
                let Some(entry) = entry else { continue };
                let loc = entry.location.ok_or_else(|| StoreError::Corrupt(format!("block {} has no location", wanted[i].0)))?;
                match containers.get(loc.container) {
                    Some(file) => out[i] = Some(Resolved { file, loc }),
                    // Compaction moved it between the lookup and now: look again.
                    None => again.push(i),
                }
            }
            lookups = again;
        }
        if let Some(&i) = lookups.first() {
            return Err(StoreError::Corrupt(format!("block {}: its container is gone", wanted[i].0)));
        }
        Ok(out)
    }

    fn check_read(&self, fp: &Fingerprint, bytes: &[u8]) -> Result<()> {
        if self.verify_reads && self.algorithm.fingerprint(bytes) != *fp {
            tracing::error!(fingerprint = %fp, "a block read from its container does not hash to its fingerprint");
            return Err(StoreError::Corrupt(format!("block {fp}: the bytes read do not hash to its fingerprint")));
        }
        Ok(())
    }

    /// Reads the blocks `entries` (consecutive blocks from disk offset `block_offset`) into
    /// the part of `buf` (which holds disk bytes from `offset`) they cover. Whole blocks in
    /// consecutive slots of one container are read with one `pread` straight into `buf`.
    pub(super) fn read_local(&self, containers: &Containers, entries: &[Option<MapEntry>], block_offset: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = u64::from(self.block_size);
        let end = offset + buf.len() as u64;
        let wanted: Vec<(Fingerprint, Option<Location>)> = entries.iter().flatten().map(|e| (e.fp, e.hint)).collect();
        let mut resolved = self.resolve(containers, &wanted)?;
        // `resolved` has one item per allocated entry, in order; `k` follows it.
        let mut k = 0;
        let take = |resolved: &mut Vec<Option<Resolved>>, k: &mut usize, fp: &Fingerprint| -> Result<Resolved> {
            let r = resolved.get_mut(*k).and_then(Option::take).ok_or_else(|| self.missing_block(fp));
            *k += 1;
            r
        };
        let mut i = 0;
        while i < entries.len() {
            let block_start = block_offset + i as u64 * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + bs);
            let Some(entry) = entries[i] else {
                buf[(from - offset) as usize..(to - offset) as usize].fill(0);
                i += 1;
                continue;
            };
            let r = take(&mut resolved, &mut k, &entry.fp)?;
            if from != block_start || to != block_start + bs {
                // A partial block: read it whole, copy the part asked for.
                let mut block = vec![0u8; bs as usize];
                r.file.read_at(&mut block, u64::from(r.loc.slot) * bs)?;
                self.check_read(&entry.fp, &block)?;
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(&block[(from - block_start) as usize..(to - block_start) as usize]);
                i += 1;
                continue;
            }
            // A run of whole blocks in consecutive slots of this container: one read.
            let mut run_end = i + 1;
            while run_end < entries.len() && block_offset + (run_end as u64 + 1) * bs <= end {
                let Some(next) = entries[run_end] else { break };
                let run_len = (run_end - i) as u64;
                let follows = resolved
                    .get(k)
                    .and_then(Option::as_ref)
                    .is_some_and(|nr| nr.loc.container == r.loc.container && u64::from(nr.loc.slot) == u64::from(r.loc.slot) + run_len);
                if !follows {
                    break;
                }
                take(&mut resolved, &mut k, &next.fp)?;
                run_end += 1;
            }
            let dst = &mut buf[(block_start - offset) as usize..(block_start - offset + (run_end - i) as u64 * bs) as usize];
            r.file.read_at(dst, u64::from(r.loc.slot) * bs)?;
            if self.verify_reads {
                // Every entry of the run is allocated (the run stops at a hole).
                for (entry, bytes) in entries[i..run_end].iter().flatten().zip(dst.chunks(bs as usize)) {
                    self.check_read(&entry.fp, bytes)?;
                }
            }
            i = run_end;
        }
        Ok(())
    }

    /// Like `read_local`, for blocks in an external pool.
    pub(super) fn read_external(&self, entries: &[Option<MapEntry>], block_offset: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = u64::from(self.block_size);
        let end = offset + buf.len() as u64;
        let fps: Vec<Option<Fingerprint>> = entries.iter().map(|e| e.map(|e| e.fp)).collect();
        // A large read is a scan (a copy, a backup, a sequential reader): it consults the
        // hot-block cache but does not fill it, so it neither evicts the hot set nor pays for
        // an extra copy of every block.
        let fill_cache = (fps.len() as u64) <= SCAN_BLOCKS;
        let datas = self.read_pool_blocks(&fps, fill_cache)?;
        for (i, data) in datas.iter().enumerate() {
            let block_start = block_offset + i as u64 * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + bs);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(from - block_start) as usize..(to - block_start) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Reads of an external pool: without `fill_cache`, blocks that miss the cache are
    /// returned as read and not cached.
    fn read_pool_blocks(&self, fps: &[Option<Fingerprint>], fill_cache: bool) -> Result<Vec<Option<BlockBytes>>> {
        if fill_cache {
            return Ok(self.load_blocks(fps)?.into_iter().map(|b| b.map(BlockBytes::Shared)).collect());
        }
        let pool = self.external_pool().expect("reads of an external pool");
        let mut out: Vec<Option<BlockBytes>> = Vec::with_capacity(fps.len());
        let mut misses: Vec<(usize, Fingerprint)> = Vec::new();
        for (i, fp) in fps.iter().enumerate() {
            out.push(None);
            if let Some(fp) = fp {
                match self.cache.get(fp) {
                    Some(d) => out[i] = Some(BlockBytes::Shared(d)),
                    None => misses.push((i, *fp)),
                }
            }
        }
        if misses.is_empty() {
            return Ok(out);
        }
        let wanted: Vec<Fingerprint> = misses.iter().map(|(_, fp)| *fp).collect();
        for ((i, fp), value) in misses.into_iter().zip(pool.get_many(&wanted)?) {
            let value = value.ok_or_else(|| self.missing_block(&fp))?;
            if value.len() != self.block_size as usize {
                return Err(StoreError::Corrupt(format!("block {fp} has {} bytes", value.len())));
            }
            out[i] = Some(BlockBytes::Owned(value));
        }
        Ok(out)
    }

    /// Blocks by fingerprint (None stays None; a block that is not stored reads as None).
    /// Local blocks are read from their containers; a block whose last reference goes
    /// meanwhile still reads right (its slot is not taken again while the reuse gate is held).
    /// External ones go through the hot-block cache.
    pub(super) fn fetch_blocks(&self, fps: &[Option<Fingerprint>]) -> Result<Vec<Option<Arc<[u8]>>>> {
        match &self.blocks {
            super::Blocks::Local(containers) => {
                let wanted: Vec<(Fingerprint, Option<Location>)> = fps.iter().flatten().map(|fp| (*fp, None)).collect();
                // Found by fingerprint, not through a map whose stripe would keep the block
                // alive: no dead slot becomes reusable between the lookup and the read.
                let _gate = containers.reuse_gate();
                let mut resolved = self.resolve(containers, &wanted)?.into_iter();
                let mut out = Vec::with_capacity(fps.len());
                for fp in fps {
                    let Some(fp) = fp else {
                        out.push(None);
                        continue;
                    };
                    match resolved.next().flatten() {
                        None => out.push(None),
                        Some(r) => {
                            let mut block = vec![0u8; self.block_size as usize];
                            r.file.read_at(&mut block, u64::from(r.loc.slot) * u64::from(self.block_size))?;
                            self.check_read(fp, &block)?;
                            out.push(Some(Arc::from(block)));
                        }
                    }
                }
                Ok(out)
            }
            super::Blocks::External(pool) => {
                let mut out: Vec<Option<Arc<[u8]>>> = Vec::with_capacity(fps.len());
                let mut misses: Vec<(usize, Fingerprint)> = Vec::new();
                for (i, fp) in fps.iter().enumerate() {
                    match fp {
                        None => out.push(None),
                        Some(fp) => match self.cache.get(fp) {
                            Some(d) => out.push(Some(d)),
                            None => {
                                out.push(None);
                                misses.push((i, *fp));
                            }
                        },
                    }
                }
                if misses.is_empty() {
                    return Ok(out);
                }
                let wanted: Vec<Fingerprint> = misses.iter().map(|(_, fp)| *fp).collect();
                let values = pool.get_many(&wanted)?;
                for ((i, fp), value) in misses.into_iter().zip(values) {
                    let Some(value) = value else { continue };
                    let data: Arc<[u8]> = value.into();
                    if data.len() != self.block_size as usize {
                        return Err(StoreError::Corrupt(format!("block {fp} has {} bytes", data.len())));
                    }
                    self.cache.insert(fp, data.clone());
                    out[i] = Some(data);
                }
                Ok(out)
            }
        }
    }
}
