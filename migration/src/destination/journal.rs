//! Post-copy's journal of missing blocks, kept across a restart.
//!
//! Two files beside the migration's record: `{id}.pending`, the blocks still missing at the
//! switch-over, and `{id}.removed`, the blocks that stopped missing since (arrived, or
//! overwritten by the guest).
//!
//! A removal reaches its file only once the store's data it stands for is durable: removals
//! wait in memory until [`sync_journal`] has synced the store, and are then appended and
//! synced. Appended at once, the kernel could write a removal back before the block's data
//! reached the disk, and a power loss in between would leave the block neither missing nor
//! stored: it would read as whatever the disk held before, with nothing left to fetch it. A
//! removal lost instead (a crash before the next sync) costs at most a fetch: at a restart a
//! block whose map already holds the content it waited for counts as arrived (`restore_one`),
//! and any other is fetched again, which can undo a guest write no flush had covered, as a
//! crash may.
//!
//! The pending file is written inside the disk's downtime, so it is laid out beforehand: when
//! a migration arrives (or is restored before its switch-over), [`PendingJournal::prepare`]
//! writes the file at full size in zeros and syncs it and its directory. The switch-over then
//! overwrites it in place, with no block allocated and no size changed, and answers SWITCHED
//! without waiting for a sync: the write is in the page cache, which a crash of the server
//! process (kill -9) does not lose. Power-loss durability follows at once, outside the
//! downtime ([`sync_journal`]): the store's data first (what arrived before the switch-over,
//! which the list counts as here), then the list's data (`fdatasync`). Every flush and FUA
//! write of the disk at the destination goes through the same sync before it completes, so
//! no write the guest was promised depends on a list that could still be lost. (The sync is
//! a cache flush of the device: 0.3-4 ms on these machines, up to 29 ms in its worst
//! moments, which the downtime no longer pays.) A list longer than the prepared room, or no
//! prepared file, takes the slow path: a new file, written, synced and renamed into place.
//!
//! A committed pending file *is* the switch-over's durable mark: its header carries a
//! checksum over the whole list, so a file torn by a crash in the middle of the overwrite
//! reads as not committed, and a committed one makes a restart serve the disk as switched
//! even if the record written after it still says pre-copy (see `restore_one`). A list lost
//! with the page cache (power lost before its sync) brings the destination back before its
//! switch-over with the source already in post-copy: the destination asks for a rebuild, and
//! the source, whose disk has stayed frozen, lists it again and switches over again (see the
//! protocol's "State machines"). Nothing the guest was promised is lost: no flush had completed.
//!
//! Format (little-endian): `CASPEND2` magic, the sequenced count at the switch-over (u64),
//! the number of entries (u64), XXH3-128 of the 16 bytes before it and the entries, then the
//! entries (block u64, fingerprint 16 bytes). The previous format (no magic: the count, then
//! the entries to the end of the file) is still read.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use cas_store::{Fingerprint, Store};
use parking_lot::Mutex;

use crate::state::StateStore;
use crate::MigrationError;

const MAGIC: &[u8; 8] = b"CASPEND2";
const HEADER: usize = 40;
const ENTRY: usize = 24;

/// A pending file laid out in zeros, ready for the switch-over to overwrite in place.
#[derive(Debug)]
pub(crate) struct PreparedJournal {
    file: std::fs::File,
    capacity: usize,
}

/// After the switch-over: the list written at the switch-over until it is synced, and the
/// removals since. Both are made durable, after the store, before any flush or FUA write of
/// the disk completes ([`sync_journal`]), so a write the guest was promised is never undone
/// by a restart.
#[derive(Debug)]
pub(crate) struct PendingJournal {
    /// The pending list, written in place and not yet synced.
    pub(crate) unsynced_list: Option<std::fs::File>,
    removed: std::fs::File,
    /// Removals not yet in the file (see the module's notes for why they wait). At most one
    /// per block of the list: bounded by the pending set, which is in memory too.
    unwritten: Vec<u64>,
}

fn encode(entries: &[(u64, Fingerprint)], processed: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER + entries.len() * ENTRY);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&processed.to_le_bytes());
    buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    buf.extend_from_slice(&[0; 16]);
    for (b, fp) in entries {
        buf.extend_from_slice(&b.to_le_bytes());
        buf.extend_from_slice(&fp.0);
    }
    let sum = checksum(&buf);
    buf[24..HEADER].copy_from_slice(&sum);
    buf
}

fn checksum(buf: &[u8]) -> [u8; 16] {
    let mut hasher = twox_hash::XxHash3_128::new();
    hasher.write(&buf[8..24]);
    hasher.write(&buf[HEADER..]);
    hasher.finish_128().to_le_bytes()
}

/// A committed list in the current format: (processed, entries bytes), or None if the file
/// is not one (zeros of a prepared file, a torn overwrite, the previous format).
fn committed_list(buf: &[u8]) -> Option<(u64, &[u8])> {
    if buf.len() < HEADER || &buf[..8] != MAGIC {
        return None;
    }
    let processed = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let count = usize::try_from(u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"))).ok()?;
    let end = count.checked_mul(ENTRY)?.checked_add(HEADER)?;
    if end > buf.len() {
        return None;
    }
    let mut sum = [0u8; 16];
    sum.copy_from_slice(&buf[24..HEADER]);
    let list = &buf[..end];
    (checksum(list) == sum).then(|| (processed, &list[HEADER..]))
}

impl PendingJournal {
    pub(crate) fn paths(state: &dyn StateStore, id: &str) -> Option<(PathBuf, PathBuf)> {
        let dir = state.dir()?;
        Some((dir.join(format!("{id}.pending")), dir.join(format!("{id}.removed"))))
    }

    /// Lays out the pending file for up to `capacity` entries (zeros: not committed) and an
    /// empty removals file, both synced with their directory. None if the store keeps no
    /// files.
    pub(crate) fn prepare(state: &dyn StateStore, id: &str, capacity: usize) -> Result<Option<PreparedJournal>, MigrationError> {
        let Some((pending, removed)) = Self::paths(state, id) else {
            return Ok(None);
        };
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&pending)?;
        // Written, not just sized: a hole or an unwritten extent would allocate or convert at
        // the switch-over, a metadata change that waits for the filesystem's journal.
        let zeros = vec![0u8; 1 << 20];
        let total = HEADER + capacity * ENTRY;
        let mut at = 0;
        while at < total {
            let n = zeros.len().min(total - at);
            file.write_all_at(&zeros[..n], at as u64)?;
            at += n;
        }
        file.sync_all()?;
        std::fs::File::create(&removed)?.sync_all()?;
        if let Some(dir) = state.dir() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(Some(PreparedJournal { file, capacity }))
    }

    /// Writes the list of blocks still missing at the switch-over: in place into the prepared
    /// file when it fits, without a sync ([`sync_journal`] follows, outside the downtime),
    /// else durably as a new file. From its return a restart of the process serves the disk
    /// as switched over; after a power loss, only once the list is synced.
    pub(crate) fn commit(
        state: &dyn StateStore,
        id: &str,
        prepared: Option<PreparedJournal>,
        entries: &[(u64, Fingerprint)],
        processed: u64,
    ) -> Result<Option<PendingJournal>, MigrationError> {
        let Some((pending, removed)) = Self::paths(state, id) else {
            return Ok(None);
        };
        let buf = encode(entries, processed);
        let unsynced_list = match prepared {
            Some(p) if entries.len() <= p.capacity => {
                p.file.write_all_at(&buf, 0)?;
                Some(p.file)
            }
            _ => {
                let tmp = pending.with_extension("pending.tmp");
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &buf)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &pending)?;
                std::fs::File::create(&removed)?.sync_all()?;
                if let Some(dir) = state.dir() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                None
            }
        };
        let removed = std::fs::OpenOptions::new().append(true).create(true).open(removed)?;
        Ok(Some(PendingJournal { unsynced_list, removed, unwritten: Vec::new() }))
    }

    /// Whether a committed list of the current format is on disk: the switch-over happened,
    /// whatever the record says.
    pub(crate) fn committed(state: &dyn StateStore, id: &str) -> Result<bool, MigrationError> {
        let Some((pending, _)) = Self::paths(state, id) else {
            return Ok(false);
        };
        match std::fs::read(pending) {
            Ok(buf) => Ok(committed_list(&buf).is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn open(state: &dyn StateStore, id: &str) -> Result<Option<PendingJournal>, MigrationError> {
        let Some((_, removed)) = Self::paths(state, id) else {
            return Ok(None);
        };
        let f = std::fs::OpenOptions::new().append(true).create(true).open(removed)?;
        Ok(Some(PendingJournal { unsynced_list: None, removed: f, unwritten: Vec::new() }))
    }

    /// The entries still missing and the sequenced count at the switch-over.
    pub(crate) fn load_from(state: &dyn StateStore, id: &str) -> Result<(Vec<(u64, Fingerprint)>, u64), MigrationError> {
        let Some((pending, removed)) = Self::paths(state, id) else {
            return Err(MigrationError::Hook("post-copy state is not kept for this store".into()));
        };
        let buf = std::fs::read(pending)?;
        let (processed, list) = if buf.starts_with(MAGIC) {
            committed_list(&buf).ok_or_else(|| MigrationError::Corrupt("the pending-blocks file is torn or damaged".into()))?
        } else {
            if buf.len() < 8 || (buf.len() - 8) % ENTRY != 0 {
                return Err(MigrationError::Corrupt("the pending-blocks file is truncated".into()));
            }
            (u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")), &buf[8..])
        };
        let gone: HashSet<u64> = match std::fs::read(removed) {
            Ok(r) => r.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e.into()),
        };
        let entries = list
            .chunks_exact(ENTRY)
            .map(|c| (u64::from_le_bytes(c[..8].try_into().expect("8 bytes")), Fingerprint(c[8..].try_into().expect("16 bytes"))))
            .filter(|(b, _)| !gone.contains(b))
            .collect();
        Ok((entries, processed))
    }

    pub(crate) fn remove(state: &dyn StateStore, id: &str) {
        if let Some((pending, removed)) = Self::paths(state, id) {
            let _ = std::fs::remove_file(pending);
            let _ = std::fs::remove_file(removed);
        }
    }

    /// Notes blocks that stopped missing; they reach the file at the next [`sync_journal`].
    pub(crate) fn note_removed(&mut self, blocks: &[u64]) {
        self.unwritten.extend_from_slice(blocks);
    }

    /// Removals noted and not yet written.
    pub(crate) fn unwritten(&self) -> usize {
        self.unwritten.len()
    }

    /// What a sync needs, taken under the journal's lock: handles to write and fsync after
    /// the lock is released (arrivals note removals under it while the pending lock is held,
    /// so an fsync under it would stall readers) and the removals it covers. Two syncs at
    /// once both sync: neither returns before what it covers is durable.
    fn begin_sync(&mut self) -> std::io::Result<JournalSync> {
        Ok(JournalSync {
            list: self.unsynced_list.as_ref().map(std::fs::File::try_clone).transpose()?,
            removed: if self.unwritten.is_empty() { None } else { Some((self.removed.try_clone()?, std::mem::take(&mut self.unwritten))) },
        })
    }
}

/// Handles to sync and removals to write, taken from a [`PendingJournal`] under its lock.
struct JournalSync {
    list: Option<std::fs::File>,
    removed: Option<(std::fs::File, Vec<u64>)>,
}

impl JournalSync {
    fn run(&self, store: &Store) -> Result<(), MigrationError> {
        if self.list.is_none() && self.removed.is_none() {
            return Ok(());
        }
        store.flush()?;
        if let Some(list) = &self.list {
            list.sync_data()?;
        }
        if let Some((file, blocks)) = &self.removed {
            use std::io::Write;
            let buf: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
            // Appends (the file is opened in append mode), so two syncs at once do not overlap.
            (&*file).write_all(&buf)?;
            file.sync_data()?;
        }
        Ok(())
    }
}

/// Makes the journal durable, with the store's data it counts as here: the store first (what
/// arrived before the switch-over, which the list counts as here, and what the removals stand
/// for), then the list, then the removals, written now. Called once just after SWITCHED,
/// before every flush or FUA write of the disk completes, and by arrivals every
/// [`REMOVALS_PER_SYNC`] removals. No lock is held during the writes and syncs. Returns whether
/// the store was flushed.
pub(crate) fn sync_journal(journal: &Mutex<Option<PendingJournal>>, store: &Store) -> Result<bool, MigrationError> {
    let sync = match journal.lock().as_mut() {
        Some(j) => j.begin_sync()?,
        None => return Ok(false),
    };
    let outcome = sync.run(store);
    if let Some(j) = journal.lock().as_mut() {
        match &outcome {
            Ok(()) if sync.list.is_some() => j.unsynced_list = None,
            Ok(()) => {}
            // Written again at the next sync (a removal twice in the file is harmless).
            Err(_) => j.unwritten.extend(sync.removed.iter().flat_map(|(_, blocks)| blocks.iter().copied())),
        }
    }
    outcome.map(|()| sync.list.is_some() || sync.removed.is_some())
}

/// After arrivals (outside the pending lock): makes the journal durable once
/// [`REMOVALS_PER_SYNC`] removals wait. A failure is logged; the next flush of the disk
/// retries the sync and reports it.
pub(crate) fn sync_journal_if_due(journal: &Mutex<Option<PendingJournal>>, store: &Store) {
    if journal.lock().as_ref().is_some_and(|j| j.unwritten() >= REMOVALS_PER_SYNC) {
        if let Err(e) = sync_journal(journal, store) {
            tracing::warn!(error = %e, "cannot make post-copy's journal durable; a flush of the disk retries");
        }
    }
}

/// Removals that make arrivals sync the journal: bounds what a power loss makes the
/// destination fetch again (64 MiB of 4 KiB blocks), at one sync per as many arrivals.
pub(crate) const REMOVALS_PER_SYNC: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::FileStateStore;

    fn entries(n: u64) -> Vec<(u64, Fingerprint)> {
        (0..n).map(|i| (i * 3, Fingerprint([i as u8; 16]))).collect()
    }

    #[test]
    fn a_prepared_journal_is_not_committed_until_the_switch_over_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = FileStateStore::open(dir.path()).unwrap();
        let prepared = PendingJournal::prepare(&state, "m1", 100).unwrap().unwrap();
        let (pending, _) = PendingJournal::paths(&state, "m1").unwrap();
        assert_eq!(std::fs::metadata(&pending).unwrap().len(), (HEADER + 100 * ENTRY) as u64);
        assert!(!PendingJournal::committed(&state, "m1").unwrap());
        let list = entries(40);
        let mut j = PendingJournal::commit(&state, "m1", Some(prepared), &list, 77).unwrap().unwrap();
        // In place: the file kept its size.
        assert_eq!(std::fs::metadata(&pending).unwrap().len(), (HEADER + 100 * ENTRY) as u64);
        assert!(PendingJournal::committed(&state, "m1").unwrap());
        j.note_removed(&[3, 6]);
        // Removals wait for the next sync, which syncs the store first.
        assert_eq!(PendingJournal::load_from(&state, "m1").unwrap().0.len(), 40);
        assert_eq!(j.unwritten(), 2);
        // Written in place without a sync; the sync after SWITCHED (or a flush's) covers the
        // list and writes the removals noted so far.
        assert!(j.unsynced_list.is_some());
        let journal = Mutex::new(Some(j));
        let store = Store::open_in_memory(cas_store::StoreOptions::default()).unwrap();
        assert!(sync_journal(&journal, &store).unwrap(), "the store was flushed");
        {
            let j = journal.lock();
            let j = j.as_ref().unwrap();
            assert!(j.unsynced_list.is_none());
            assert_eq!(j.unwritten(), 0);
        }
        let (left, processed) = PendingJournal::load_from(&state, "m1").unwrap();
        assert_eq!(processed, 77);
        assert_eq!(left.len(), 38);
        assert!(left.iter().all(|(b, _)| *b != 3 && *b != 6));
        assert_eq!(left[0], list[0]);
        // Nothing left to make durable: no store flush.
        assert!(!sync_journal(&journal, &store).unwrap());
        journal.lock().as_mut().unwrap().note_removed(&[9]);
        assert!(sync_journal(&journal, &store).unwrap());
        assert_eq!(PendingJournal::load_from(&state, "m1").unwrap().0.len(), 37);
    }

    #[test]
    fn a_list_longer_than_the_prepared_room_or_no_prepared_file_takes_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = FileStateStore::open(dir.path()).unwrap();
        let prepared = PendingJournal::prepare(&state, "m2", 4).unwrap();
        PendingJournal::commit(&state, "m2", prepared, &entries(10), 5).unwrap();
        assert!(PendingJournal::committed(&state, "m2").unwrap());
        assert_eq!(PendingJournal::load_from(&state, "m2").unwrap(), (entries(10), 5));
        PendingJournal::commit(&state, "m3", None, &[], 9).unwrap();
        assert_eq!(PendingJournal::load_from(&state, "m3").unwrap(), (vec![], 9));
    }

    #[test]
    fn a_torn_overwrite_reads_as_not_committed_and_the_old_format_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let state = FileStateStore::open(dir.path()).unwrap();
        let prepared = PendingJournal::prepare(&state, "m4", 100).unwrap();
        PendingJournal::commit(&state, "m4", prepared, &entries(50), 1).unwrap();
        let (pending, _) = PendingJournal::paths(&state, "m4").unwrap();
        // A crash that wrote the header's page but not the rest of the list.
        let f = std::fs::OpenOptions::new().write(true).open(&pending).unwrap();
        f.write_all_at(&[0u8; 24], (HEADER + 45 * ENTRY) as u64).unwrap();
        assert!(!PendingJournal::committed(&state, "m4").unwrap());
        assert!(matches!(PendingJournal::load_from(&state, "m4"), Err(MigrationError::Corrupt(_))));
        // The previous format: the count, then the entries.
        let mut old = 12u64.to_le_bytes().to_vec();
        for (b, fp) in entries(3) {
            old.extend_from_slice(&b.to_le_bytes());
            old.extend_from_slice(&fp.0);
        }
        std::fs::write(&pending, &old).unwrap();
        assert!(!PendingJournal::committed(&state, "m4").unwrap());
        assert_eq!(PendingJournal::load_from(&state, "m4").unwrap(), (entries(3), 12));
    }
}
