//! The disk the destination serves while a migration arrives: a *standby* export before
//! the switch-over (reads through to the source, writes held), then post-copy reads and
//! writes over blocks still arriving.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cas_store::{DiskId, Extent, Fingerprint, Store, StoreError};
use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc;

use crate::protocol::{DestReport, Message};
use crate::recent::RecentFingerprints;
use crate::wire::Frame;

use super::*;

/// How long a read of a block that has not arrived (or a read through to the source before
/// the switch-over) waits for it before failing with EIO.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a write to the standby export waits for the switch-over before failing with EIO
/// (a hypervisor writes only after it resumes the VM, which follows the switch-over).
pub(crate) const STANDBY_WRITE_TIMEOUT: Duration = Duration::from_secs(300);

/// Reads the standby export has asked the source for, by request id.
#[derive(Debug, Default)]
pub(crate) struct ReadThrough {
    pub(crate) next_id: u64,
    /// Asked and not answered: (offset, length), resent on every new connection.
    pub(crate) asked: HashMap<u64, (u64, u32)>,
    pub(crate) answers: HashMap<u64, Result<Vec<u8>, String>>,
}

/// Blocks of the incoming disk that are listed but not local yet.
#[derive(Debug)]
pub(crate) struct Pending {
    /// Block -> the content it must get.
    pub(crate) by_block: HashMap<u64, Fingerprint>,
    /// Content asked for -> blocks that may be waiting for it (entries are checked against
    /// `by_block` on arrival: a later round or a local write may have superseded them).
    pub(crate) waiting: HashMap<Fingerprint, Vec<u64>>,
    /// Fingerprints asked for and not arrived.
    pub(crate) wanted: HashSet<Fingerprint>,
    /// Missing content another migration of the gang asked its source for (see `gang`).
    pub(crate) borrowed: HashSet<Fingerprint>,
    /// Fingerprints that arrived lately during this migration (bounded: see
    /// [`RecentFingerprints`]), to count in-disk duplicates apart from neighbours' blocks.
    pub(crate) received: RecentFingerprints,
    /// Fingerprints asked for on demand (a read or a partial write waits for them).
    pub(crate) urgent: HashSet<Fingerprint>,
    /// Missing content that deferred rounds listed (`Hello::defer_dirty`): asked for at the
    /// switch-over, if a block still needs it then.
    pub(crate) deferred: HashSet<Fingerprint>,
    pub(crate) phase: DiskPhase,
    pub(crate) reads: ReadThrough,
    pub(crate) report: DestReport,
}

impl Pending {
    pub(crate) fn new(phase: DiskPhase) -> Pending {
        Pending {
            by_block: HashMap::new(),
            waiting: HashMap::new(),
            wanted: HashSet::new(),
            borrowed: HashSet::new(),
            received: RecentFingerprints::default(),
            urgent: HashSet::new(),
            deferred: HashSet::new(),
            phase,
            reads: ReadThrough::default(),
            report: DestReport::default(),
        }
    }
}

/// The state a [`MigratingDisk`] shares with the migration that fills it.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) store: Arc<Store>,
    pub(crate) disk: DiskId,
    pub(crate) block_size: u64,
    pub(crate) pending: Mutex<Pending>,
    pub(crate) arrived: Condvar,
    /// FETCH frames go to the writer through this.
    pub(crate) fetch: mpsc::UnboundedSender<Frame>,
    /// After the switch-over: what is still missing, kept across a restart.
    pub(crate) journal: Mutex<Option<PendingJournal>>,
    /// Before the switch-over: the pending file laid out for it (see `journal.rs`).
    pub(crate) prepared_journal: Mutex<Option<PreparedJournal>>,
    /// The source answers READ (its HELLO said so).
    pub(crate) read_through: bool,
    /// The migration's place in its gang, if it has one.
    pub(crate) gang: Option<GangMember>,
    /// Listed blocks that are here, still to map (see `backlog.rs`).
    pub(crate) backlog: MapBacklog,
}

/// The disk as the destination serves it from the moment a migration arrives.
///
/// * **Standby** (before the switch-over, the source authoritative; the destination host
///   attaches when it creates the incoming VM): a read is answered with the source's current
///   content (READ over the link; without it, the read waits for the switch-over); a write,
///   zero or trim is held until the switch-over and then applied (at most
///   [`STANDBY_WRITE_TIMEOUT`], then EIO); FLUSH succeeds at once (nothing was acknowledged
///   here); block status reports everything allocated. Nothing stale is ever returned and no
///   acknowledged write is lost.
/// * **Post-copy** (after SWITCH): blocks already local come from the store; a read of a
///   block still in flight asks the source for it at once (ahead of the background
///   transfer) and waits; a write that covers a missing block wins over its late arrival; a
///   partial write of a missing block fetches it first.
///
/// The same connections go on across the switch-over: requests held in standby continue as
/// post-copy requests.
#[derive(Debug)]
pub struct MigratingDisk {
    pub(crate) inner: Arc<Incoming>,
}

/// Errors a [`MigratingDisk`] returns.
#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("block not available: {0}")]
    Unavailable(String),
}

impl MigratingDisk {
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub fn disk_id(&self) -> DiskId {
        self.inner.disk
    }

    pub fn size(&self) -> Result<u64, StoreError> {
        self.inner.store.disk_size(self.inner.disk)
    }

    /// Blocks still missing locally.
    pub fn missing_blocks(&self) -> usize {
        self.inner.pending.lock().by_block.len()
    }

    pub(crate) fn blocks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let bs = self.inner.block_size;
        if len == 0 {
            #[allow(clippy::reversed_empty_ranges)]
            return 1..=0;
        }
        offset / bs..=(offset + len - 1) / bs
    }

    /// Waits until none of `blocks` is pending, asking for them on demand. Returns with the
    /// pending lock held, so the caller can act before an arrival changes anything.
    pub(crate) fn wait_local<'a>(
        &'a self,
        mut guard: parking_lot::MutexGuard<'a, Pending>,
        needed: impl Fn(&Pending) -> Vec<Fingerprint>,
    ) -> Result<parking_lot::MutexGuard<'a, Pending>, PostCopyError> {
        let deadline = Instant::now() + FETCH_TIMEOUT;
        loop {
            let missing = needed(&guard);
            if missing.is_empty() {
                return Ok(guard);
            }
            if let Some(why) = guard.phase.failure() {
                return Err(PostCopyError::Unavailable(format!("migration failed: {why}")));
            }
            let ask: Vec<Fingerprint> = missing.into_iter().filter(|fp| guard.urgent.insert(*fp)).collect();
            for fp in &ask {
                // Content another migration of the gang is bringing: a reader waits for it,
                // so this migration's own source sends it now.
                if guard.borrowed.remove(fp) {
                    guard.wanted.insert(*fp);
                    guard.report.wanted += 1;
                }
            }
            if !ask.is_empty() {
                let _ = self.inner.fetch.send(Frame::new(&Message::Fetch(ask)));
            }
            if self.inner.arrived.wait_until(&mut guard, deadline).timed_out() {
                return Err(PostCopyError::Unavailable(format!("waited {FETCH_TIMEOUT:?} for the source")));
            }
        }
    }

    pub(crate) fn pending_in(&self, p: &Pending, blocks: std::ops::RangeInclusive<u64>) -> Vec<Fingerprint> {
        if p.by_block.is_empty() {
            return Vec::new();
        }
        let mut fps: Vec<Fingerprint> = blocks.filter_map(|b| p.by_block.get(&b).copied()).collect();
        fps.sort_unstable();
        fps.dedup();
        fps
    }

    /// Whether the disk is still in standby (the source authoritative).
    pub fn is_standby(&self) -> bool {
        self.inner.pending.lock().phase == DiskPhase::Standby
    }

    /// Waits (with the pending lock) until the disk has left standby; fails if it never
    /// will.
    fn wait_switch<'a>(
        &'a self,
        mut guard: parking_lot::MutexGuard<'a, Pending>,
        limit: Duration,
    ) -> Result<parking_lot::MutexGuard<'a, Pending>, PostCopyError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(why) = guard.phase.failure() {
                return Err(PostCopyError::Unavailable(format!("migration failed: {why}")));
            }
            if guard.phase != DiskPhase::Standby {
                return Ok(guard);
            }
            if self.inner.arrived.wait_until(&mut guard, deadline).timed_out() {
                return Err(PostCopyError::Unavailable(format!("the switch-over did not come within {limit:?}")));
            }
        }
    }

    /// A standby read: asks the source for the bytes as they are there now. Returns false
    /// if the switch-over came first (the caller then reads locally, post-copy).
    fn read_through(&self, mut guard: parking_lot::MutexGuard<'_, Pending>, offset: u64, buf: &mut [u8]) -> Result<bool, PostCopyError> {
        let mut ids = Vec::new();
        let mut at = 0usize;
        while at < buf.len() {
            let len = (buf.len() - at).min(crate::protocol::MAX_READ as usize);
            let id = guard.reads.next_id;
            guard.reads.next_id += 1;
            let (off, length) = (offset + at as u64, len as u32);
            guard.reads.asked.insert(id, (off, length));
            let _ = self.inner.fetch.send(Frame::new(&Message::Read { id, offset: off, length }));
            ids.push((id, at, len));
            at += len;
        }
        let deadline = Instant::now() + FETCH_TIMEOUT;
        let forget = |p: &mut Pending| {
            for (id, _, _) in &ids {
                p.reads.asked.remove(id);
                p.reads.answers.remove(id);
            }
        };
        loop {
            if let Some(why) = guard.phase.failure().map(str::to_string) {
                forget(&mut guard);
                return Err(PostCopyError::Unavailable(format!("migration failed: {why}")));
            }
            if guard.phase != DiskPhase::Standby {
                forget(&mut guard);
                return Ok(false);
            }
            if ids.iter().all(|(id, _, _)| guard.reads.answers.contains_key(id)) {
                let mut result = Ok(true);
                for (id, at, len) in &ids {
                    match guard.reads.answers.remove(id).expect("checked") {
                        Ok(data) if data.len() == *len => buf[*at..*at + *len].copy_from_slice(&data),
                        Ok(data) => result = Err(PostCopyError::Unavailable(format!("the source answered {} bytes for a read of {len}", data.len()))),
                        Err(why) => result = Err(PostCopyError::Unavailable(format!("the source could not read: {why}"))),
                    }
                }
                return result;
            }
            if self.inner.arrived.wait_until(&mut guard, deadline).timed_out() {
                forget(&mut guard);
                return Err(PostCopyError::Unavailable(format!("waited {FETCH_TIMEOUT:?} for the source to answer a read")));
            }
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PostCopyError> {
        let blocks = self.blocks(offset, buf.len() as u64);
        let mut guard = self.inner.pending.lock();
        if guard.phase == DiskPhase::Standby {
            if self.inner.read_through {
                if self.read_through(guard, offset, buf)? {
                    return Ok(());
                }
                guard = self.inner.pending.lock();
            } else {
                guard = self.wait_switch(guard, FETCH_TIMEOUT)?;
            }
        }
        let guard = self.wait_local(guard, |p| self.pending_in(p, blocks.clone()))?;
        // Blocks never become pending again after the switch-over, and arrivals only write
        // pending blocks: once none is pending here, the store has them.
        drop(guard);
        Ok(self.inner.store.read(self.inner.disk, offset, buf)?)
    }

    /// A write-like change of `[offset, offset + len)`: missing blocks the range covers
    /// entirely are dropped from the pending set (the write wins); partially covered ones are
    /// fetched first, since the write keeps part of their old content.
    pub(crate) fn change(&self, offset: u64, len: u64, fua: bool, apply: impl FnOnce() -> Result<(), StoreError>) -> Result<(), PostCopyError> {
        let bs = self.inner.block_size;
        let blocks = self.blocks(offset, len);
        let end = offset + len;
        let partial = |b: u64| b * bs < offset || (b + 1) * bs > end;
        let mut guard = self.inner.pending.lock();
        if guard.phase == DiskPhase::Standby {
            // Held until the switch-over: the source is authoritative until then.
            guard = self.wait_switch(guard, STANDBY_WRITE_TIMEOUT)?;
        }
        let mut guard = self.wait_local(guard, |p| {
            let mut fps: Vec<Fingerprint> = blocks.clone().filter(|&b| partial(b)).filter_map(|b| p.by_block.get(&b).copied()).collect();
            fps.sort_unstable();
            fps.dedup();
            fps
        })?;
        let covered: Vec<u64> = if guard.by_block.is_empty() { Vec::new() } else { blocks.filter(|b| guard.by_block.contains_key(b)).collect() };
        if covered.is_empty() {
            drop(guard);
            if fua {
                self.sync_journal()?;
            }
            return Ok(apply()?);
        }
        // Keep the lock while writing, so no reader sees these blocks neither old nor new.
        // The journal notes that these blocks no longer wait for the source; the next flush
        // (for FUA, right after the lock is released, before the reply: readers do not wait
        // for an fsync) makes that durable after the write, so a restart never lets a late
        // arrival overwrite a write the guest was promised.
        if let Some(j) = self.inner.journal.lock().as_mut() {
            j.note_removed(&covered);
        }
        for b in covered {
            guard.by_block.remove(&b);
        }
        apply()?;
        drop(guard);
        if fua {
            self.sync_journal()?;
        }
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, data.len() as u64, fua, || i.store.write(i.disk, offset, data, fua))
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, len, fua, || i.store.write_zeroes(i.disk, offset, len, fua))
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, len, fua, || i.store.trim(i.disk, offset, len, fua))
    }

    pub fn flush(&self) -> Result<(), PostCopyError> {
        if self.is_standby() {
            // Nothing was acknowledged here: the source holds every write so far.
            return Ok(());
        }
        if !self.sync_journal()? {
            self.inner.store.flush()?;
        }
        Ok(())
    }

    /// Makes the store and then the journal (the list of the switch-over, the removals since)
    /// durable before a write that must survive a crash (see [`super::journal::sync_journal`]).
    /// Returns whether the store was flushed (nothing to make durable: not).
    pub(crate) fn sync_journal(&self) -> Result<bool, PostCopyError> {
        super::journal::sync_journal(&self.inner.journal, &self.inner.store).map_err(|e| PostCopyError::Unavailable(format!("post-copy journal: {e}")))
    }

    /// The store's allocation, with blocks still in flight reported as allocated (they hold
    /// data; reporting them as holes would let a copying client skip them).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, PostCopyError> {
        if self.is_standby() {
            // The source's allocation is not known here: report data (never a false hole).
            return Ok(vec![Extent { offset, length: len, allocated: true }]);
        }
        let extents = self.inner.store.block_status(self.inner.disk, offset, len)?;
        let p = self.inner.pending.lock();
        if p.by_block.is_empty() || len == 0 {
            return Ok(extents);
        }
        let bs = self.inner.block_size;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |from: u64, to: u64, allocated: bool| match out.last_mut() {
            Some(e) if e.allocated == allocated && e.offset + e.length == from => e.length += to - from,
            _ => out.push(Extent { offset: from, length: to - from, allocated }),
        };
        for e in extents {
            if e.allocated {
                push(e.offset, e.offset + e.length, true);
                continue;
            }
            // Split holes at blocks that are pending.
            let mut cursor = e.offset;
            for b in self.blocks(e.offset, e.length) {
                if p.by_block.contains_key(&b) {
                    let from = (b * bs).max(e.offset);
                    let to = ((b + 1) * bs).min(e.offset + e.length).min(end);
                    push(cursor, from, false);
                    push(from, to, true);
                    cursor = to;
                }
            }
            let stop = e.offset + e.length;
            if cursor < stop {
                push(cursor, stop, false);
            }
        }
        out.retain(|e| e.length > 0);
        Ok(out)
    }
}
