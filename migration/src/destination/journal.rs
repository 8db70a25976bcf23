//! Post-copy's journal of missing blocks, kept across a restart.

use std::collections::HashSet;

use cas_store::Fingerprint;

use crate::state::StateStore;
use crate::MigrationError;

/// After the switch-over, the blocks still missing, and the ones that stopped missing since
/// (arrived, or overwritten by the guest), as two files beside the migration's record. The
/// removals file is appended to without a sync; it is synced before any flush or FUA write
/// of the disk completes, so a write the guest was promised is never undone by a restart.
#[derive(Debug)]
pub(crate) struct PendingJournal {
    pub(crate) removed: std::fs::File,
    /// Removals appended since the last sync.
    /// Appends so far, and how many of them an fsync has covered.
    pub(crate) appended: u64,
    pub(crate) synced: u64,
}

impl PendingJournal {
    pub(crate) fn paths(state: &dyn StateStore, id: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        let dir = state.dir()?;
        Some((dir.join(format!("{id}.pending")), dir.join(format!("{id}.removed"))))
    }

    pub(crate) fn create(state: &dyn StateStore, id: &str, entries: &[(u64, Fingerprint)], processed: u64) -> Result<Option<PendingJournal>, MigrationError> {
        use std::io::Write;
        let Some((pending, removed)) = Self::paths(state, id) else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(8 + entries.len() * 24);
        buf.extend_from_slice(&processed.to_le_bytes());
        for (b, fp) in entries {
            buf.extend_from_slice(&b.to_le_bytes());
            buf.extend_from_slice(&fp.0);
        }
        let tmp = pending.with_extension("pending.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &pending)?;
        let removed = std::fs::File::create(&removed)?;
        removed.sync_all()?;
        if let Some(dir) = state.dir() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(Some(PendingJournal { removed, appended: 0, synced: 0 }))
    }

    pub(crate) fn open(state: &dyn StateStore, id: &str) -> Result<Option<PendingJournal>, MigrationError> {
        let Some((_, removed)) = Self::paths(state, id) else {
            return Ok(None);
        };
        let f = std::fs::OpenOptions::new().append(true).create(true).open(removed)?;
        Ok(Some(PendingJournal { removed: f, appended: 0, synced: 0 }))
    }

    /// The entries still missing and the sequenced count at the switch-over.
    pub(crate) fn load_from(state: &dyn StateStore, id: &str) -> Result<(Vec<(u64, Fingerprint)>, u64), MigrationError> {
        let Some((pending, removed)) = Self::paths(state, id) else {
            return Err(MigrationError::Hook("post-copy state is not kept for this store".into()));
        };
        let buf = std::fs::read(pending)?;
        if buf.len() < 8 || (buf.len() - 8) % 24 != 0 {
            return Err(MigrationError::Corrupt("the pending-blocks file is truncated".into()));
        }
        let processed = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let gone: HashSet<u64> = match std::fs::read(removed) {
            Ok(r) => r.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e.into()),
        };
        let entries = buf[8..]
            .chunks_exact(24)
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

    pub(crate) fn note_removed(&mut self, blocks: &[u64]) -> std::io::Result<()> {
        use std::io::Write;
        let mut buf = Vec::with_capacity(blocks.len() * 8);
        for b in blocks {
            buf.extend_from_slice(&b.to_le_bytes());
        }
        self.removed.write_all(&buf)?;
        self.appended += 1;
        Ok(())
    }

    /// What a sync needs, taken under the journal's lock: a handle to fsync after the lock is
    /// released (arrivals append under it while the pending lock is held, so an fsync under it
    /// would stall readers) and the appends it covers; None if every append is synced. Two
    /// syncs at once both fsync: neither returns before its appends are durable.
    pub(crate) fn begin_sync(&mut self) -> std::io::Result<Option<(std::fs::File, u64)>> {
        if self.synced == self.appended {
            return Ok(None);
        }
        Ok(Some((self.removed.try_clone()?, self.appended)))
    }

    /// An fsync begun at `covered` appends succeeded.
    pub(crate) fn synced_to(&mut self, covered: u64) {
        self.synced = self.synced.max(covered);
    }
}
