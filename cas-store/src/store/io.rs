//! Disk I/O: reads, writes, zeroes, trims and block status.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{out_of_range, DiskId, DiskState, Extent, Source, Store, Target, BLOCK_STRIPES, CHUNK_BLOCKS};
use crate::{Result, StoreError};

/// Writes of at most this many blocks look their old map entries up through the map cache.
const SMALL_WRITE_BLOCKS: u64 = 8;

impl Store {
    pub(super) fn io_state(&self, disk: DiskId) -> Result<Arc<DiskState>> {
        let state = self.state(disk)?;
        Ok(state)
    }

    pub(super) fn check_range(state: &DiskState, offset: u64, length: u64) -> Result<()> {
        let size = state.size.load(Ordering::Acquire);
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, length, size)),
        }
    }

    /// Refuses writes to a deleted or read-only disk; the caller holds the disk's layout lock.
    fn check_write_target(state: &DiskState, disk: DiskId) -> Result<()> {
        if state.deleted.load(Ordering::Acquire) {
            return Err(StoreError::DiskNotFound(format!("#{}", disk.0)));
        }
        state.check_writable(|| format!("#{}", disk.0))
    }

    pub(super) fn block_stripe(&self, disk: DiskId, block: u64) -> usize {
        // Consecutive blocks land on consecutive stripes, so one chunk never locks a stripe twice.
        (disk.0.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(block) % BLOCK_STRIPES as u64) as usize
    }

    /// The stripes of `blocks`, sorted and each once: the order every writer locks them in.
    pub(super) fn stripe_indices(&self, disk: DiskId, blocks: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let mut idx: Vec<usize> = blocks.into_iter().map(|b| self.block_stripe(disk, b)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx
    }

    /// Reads `buf.len()` bytes at `offset`. Any range inside the disk, aligned or not.
    pub fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let state = self.io_state(disk)?;
        let _layout = state.layout.read();
        if state.deleted.load(Ordering::Acquire) {
            return Err(StoreError::DiskNotFound(format!("#{}", disk.0)));
        }
        Self::check_range(&state, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.block_size);
        let end = offset + buf.len() as u64;
        let mut first = offset / bs;
        let last = (end - 1) / bs;
        while first <= last {
            let chunk_last = last.min(first + CHUNK_BLOCKS - 1);
            let stripes = self.stripe_indices(disk, first..=chunk_last);
            let _guards: Vec<_> = stripes.iter().map(|&i| self.block_stripes[i].read()).collect();
            let entries = self.map_lookup(disk, first, chunk_last)?;
            let block_offset = first * bs;
            match self.containers() {
                Some(containers) => self.read_local(containers, &entries, block_offset, offset, buf)?,
                None => self.read_external(&entries, block_offset, offset, buf)?,
            }
            first = chunk_last + 1;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. With `fua`, the data is durable when this returns.
    pub fn write(&self, disk: DiskId, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.update(disk, offset, data.len() as u64, Source::Data(data), fua)
    }

    /// Writes several requests that arrived together, as one commit when they can be: whole
    /// blocks, no block written twice, [`CHUNK_BLOCKS`] blocks at most in all (an NBD
    /// connection's small writes at a high queue depth). Then they cost one map lookup, one
    /// `refs` lookup, one container append and one engine batch instead of one each; the
    /// commit is atomic, so on an error none of them was applied. Other sets are written one
    /// request after the other. No order among the requests is kept (NBD orders none between
    /// requests in flight). With `fua`, all of them are durable when this returns.
    pub fn write_many(&self, disk: DiskId, writes: &[(u64, &[u8])], fua: bool) -> Result<()> {
        let bs = u64::from(self.block_size);
        let mut blocks: Vec<(u64, &[u8])> = Vec::new();
        let groupable = writes.len() > 1
            && writes.iter().all(|(offset, data)| offset % bs == 0 && !data.is_empty() && data.len() as u64 % bs == 0)
            && writes.iter().map(|(_, data)| data.len() as u64 / bs).sum::<u64>() <= CHUNK_BLOCKS;
        if groupable {
            for (offset, data) in writes {
                blocks.extend(data.chunks(bs as usize).enumerate().map(|(i, bytes)| (offset / bs + i as u64, bytes)));
            }
            blocks.sort_unstable_by_key(|(block, _)| *block);
        }
        if !groupable || blocks.windows(2).any(|w| w[0].0 == w[1].0) {
            for (offset, data) in writes {
                self.update(disk, *offset, data.len() as u64, Source::Data(data), false)?;
            }
        } else {
            let state = self.io_state(disk)?;
            let _layout = state.layout.read();
            Self::check_write_target(&state, disk)?;
            for (offset, data) in writes {
                Self::check_range(&state, *offset, data.len() as u64)?;
            }
            // Hashed before any lock is taken, as in `update_chunk`.
            let targets: Vec<Target<'_>> = blocks.iter().map(|(_, bytes)| self.target_for(Cow::Borrowed(*bytes))).collect();
            let ids: Vec<u64> = blocks.iter().map(|(block, _)| *block).collect();
            let stripes = self.stripe_indices(disk, ids.iter().copied());
            let _guards: Vec<_> = stripes.iter().map(|&i| self.block_stripes[i].write()).collect();
            let old: Vec<_> = self.map_lookup_for_write(disk, &ids)?.iter().map(|e| e.map(|e| e.fp)).collect();
            self.commit(&state, ids.into_iter().zip(targets).collect(), &old)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes a range read as zeros; whole blocks inside it are released, not stored.
    pub fn write_zeroes(&self, disk: DiskId, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.update(disk, offset, len, Source::Zeroes, fua)
    }

    /// Discards a range. In this store a discarded range reads as zeros, like `write_zeroes`.
    pub fn trim(&self, disk: DiskId, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.update(disk, offset, len, Source::Zeroes, fua)
    }

    fn update(&self, disk: DiskId, offset: u64, len: u64, source: Source<'_>, fua: bool) -> Result<()> {
        let state = self.io_state(disk)?;
        {
            let _layout = state.layout.read();
            Self::check_write_target(&state, disk)?;
            Self::check_range(&state, offset, len)?;
            self.update_range(&state, offset, len, source)?;
        }
        if fua {
            // Outside every lock: a sync covers this write and any other already applied.
            self.flush()?;
        }
        Ok(())
    }

    /// Applies a range update; the caller holds the disk's layout lock (either way).
    ///
    /// A range of several chunks is applied by up to `write_threads` threads, each taking the
    /// next chunk: chunks touch different blocks (different stripes), and NBD does not order
    /// the parts of one request against each other, only the request against its reply.
    pub(super) fn update_range(&self, state: &DiskState, offset: u64, len: u64, source: Source<'_>) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let chunks = (last - first) / CHUNK_BLOCKS + 1;
        let chunk = |i: u64| {
            let from = first + i * CHUNK_BLOCKS;
            self.update_chunk(state, offset, end, from, last.min(from + CHUNK_BLOCKS - 1), source)
        };
        let threads = (self.write_threads as u64).min(chunks);
        if threads <= 1 {
            return (0..chunks).try_for_each(chunk);
        }
        let next = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        let work = || -> Result<()> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chunks || failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if let Err(e) = chunk(i) {
                    // The other threads stop at their next chunk, as one thread would have.
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        };
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
            let mut outcome = work();
            for helper in helpers {
                let done = helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                outcome = outcome.and(done);
            }
            outcome
        })
    }

    /// Applies the update of blocks `first..=chunk_last` of the range `offset..end`.
    fn update_chunk(&self, state: &DiskState, offset: u64, end: u64, first: u64, chunk_last: u64, source: Source<'_>) -> Result<()> {
        let bs = u64::from(self.block_size);
        // Whole blocks are hashed before any lock is taken.
        let mut full: Vec<Option<Target<'_>>> = Vec::with_capacity((chunk_last - first + 1) as usize);
        for block in first..=chunk_last {
            let start = block * bs;
            let covered = offset <= start && start + bs <= end;
            full.push(covered.then(|| match source {
                Source::Zeroes => Target::Zero,
                Source::Data(d) => {
                    let bytes = &d[(start - offset) as usize..(start - offset + bs) as usize];
                    self.target_for(Cow::Borrowed(bytes))
                }
            }));
        }
        let stripes = self.stripe_indices(state.id, first..=chunk_last);
        let _guards: Vec<_> = stripes.iter().map(|&i| self.block_stripes[i].write()).collect();
        // A small write (a guest's 4 KiB overwrite) takes its old entries from the map cache;
        // a large one seeks `maps` once for its range, and leaves the cache to small writes.
        let old = if chunk_last - first < SMALL_WRITE_BLOCKS {
            self.map_lookup_for_write(state.id, &(first..=chunk_last).collect::<Vec<u64>>())?
        } else {
            self.map_lookup(state.id, first, chunk_last)?
        };
        let mut updates = Vec::with_capacity(full.len());
        for (i, target) in full.into_iter().enumerate() {
            let block = first + i as u64;
            let target = match target {
                Some(t) => t,
                None => {
                    // A partial block: read, modify, write, under the block's stripe.
                    let start = block * bs;
                    let mut bytes = match old[i] {
                        Some(entry) => self.load_block(&entry.fp)?.to_vec(),
                        None => vec![0u8; bs as usize],
                    };
                    let from = offset.max(start);
                    let to = end.min(start + bs);
                    let dst = &mut bytes[(from - start) as usize..(to - start) as usize];
                    match source {
                        Source::Zeroes => dst.fill(0),
                        Source::Data(d) => dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize]),
                    }
                    self.target_for(Cow::Owned(bytes))
                }
            };
            updates.push((block, target));
        }
        let old: Vec<_> = old.iter().map(|e| e.map(|e| e.fp)).collect();
        self.commit(state, updates, &old)?;
        Ok(())
    }

    /// Allocated and zero runs of `[offset, offset + len)`, at block granularity, clipped to
    /// the range. Consecutive runs alternate.
    pub fn block_status(&self, disk: DiskId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let state = self.io_state(disk)?;
        let _layout = state.layout.read();
        Self::check_range(&state, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |from: u64, to: u64, allocated: bool| {
            if from >= to {
                return;
            }
            match extents.last_mut() {
                Some(e) if e.allocated == allocated && e.offset + e.length == from => e.length += to - from,
                _ => extents.push(Extent { offset: from, length: to - from, allocated }),
            }
        };
        let mut cursor = offset;
        for entry in self.map_scan(disk, first, last + 1, usize::MAX)? {
            let (block, _) = entry?;
            let from = (block * bs).max(offset);
            let to = ((block + 1) * bs).min(end);
            push(cursor, from, false);
            push(from, to, true);
            cursor = to;
        }
        push(cursor, end, false);
        Ok(extents)
    }
}
