//! The write path of `refs` and `maps`: a journal in the engine's log, overlays in memory, and
//! folds of the overlays into `refs` and `maps` as sorted table files, off the write path.
//! This file keeps the journal and the counts' side; the map's side is `map_overlay` (a
//! commit's map changes are a second record under the same sequence number, in the same
//! batch, applied to their overlay with the counts and folded with them; everything below
//! holds for both).
//!
//! Why: a block new to the store used to cost a `refs` insert at a random key into a 64 MiB
//! skiplist (about 4 us, mostly cache misses: 35-45 % of the server's CPU while it took
//! sequential writes of new blocks; without it the same writes took half the CPU). Now a
//! commit puts one *journal record* (its reference changes, under a sequential key in `meta`:
//! a cheap insert at the skiplist's end) in the same atomic batch as its map changes, and
//! applies the changes to the *overlay* after the batch is written. Lookups ask the overlay
//! first, then `refs`. A *fold* (a thread of the store's own, once the overlay holds
//! [`FOLD_AT`] fingerprints) writes the overlay's entries as one sorted table file that the
//! engine links into `refs` (no memtable inserts), then deletes the journal records that file
//! covers.
//!
//! Values are absolute (a count and a location, or "gone"), so applying a record again is
//! harmless. Changes of one fingerprint are made under its fingerprint stripe, held from the
//! allocation of the record's sequence number to the overlay's update: per fingerprint,
//! sequence order is commit order.
//!
//! Crash safety:
//! - a record is in the batch of the map changes it accounts for: both or neither survive;
//! - a fold syncs the containers, then the engine's log, before it links its file, so no count
//!   reaches `refs` ahead of the map changes that made it (a lost tail of the log loses both,
//!   or neither), nor a map change ahead of the bytes it names;
//! - it deletes only the records below the *watermark*: the lowest sequence number whose
//!   changes may not be in the overlay yet (a commit between its write and its overlay update),
//!   taken before the overlay is read, so every change those records hold is in the file or
//!   in an earlier one, or a newer value is;
//! - it drops from the overlay only the entries whose records it deleted: an entry whose
//!   record stays keeps every later change of its count in the journal (a disk copy raises a
//!   count with a merge operand when the overlay does not hold it; an open replaying the
//!   record over that would lose the raise);
//! - at open, the records left are applied in sequence order and folded, and the deletions are
//!   synced before new records are written, so an old record never comes back after new ones.
//!
//! Memory: the overlay holds at most [`FOLD_HARD_CAP`] fingerprints, 48 bytes each in hash
//! tables between 44 and 87 % full (55-110 bytes, at most 56 MiB): past it a commit folds
//! before it proceeds. Usually the fold thread keeps it near [`FOLD_AT`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::map_overlay::{self, MapChanges, MapOverlay, MAPS_LOG_PREFIX};
use super::DiskId;
use crate::container::Containers;
use crate::engine::{prefix_end, Cf, KvEngine, WriteBatch};
use crate::keys::{encode_map_entry, encode_ref, map_key, parse_ref, MapEntry, RefEntry};
use crate::{Fingerprint, FingerprintMap, Result, StoreError};

/// Prefix of a journal record's key in `meta` (then its sequence number, u64 BE).
pub(crate) const REFS_LOG_PREFIX: &[u8] = b"refs-log/";
/// Overlay size at which the fold thread starts a fold (about 512 MiB of new 4 KiB blocks).
/// A fold syncs the containers first, which takes a while after a large write: it starts
/// early, so that writes arriving meanwhile stay below [`FOLD_HARD_CAP`] (with folds at
/// 256 Ki, 2 GiB passes of new blocks ran at 273-399 MB/s, 380-483 MB/s at 128 Ki).
pub(super) const FOLD_AT: usize = 128 << 10;
/// Overlay size past which a commit folds before it proceeds (the fold thread is behind).
pub(super) const FOLD_HARD_CAP: usize = 512 << 10;
const SHARDS: usize = 64;

/// A reference change: the entry's new value (None: the entry goes).
pub(super) type RefChange = (Fingerprint, Option<RefEntry>);

fn log_key(seq: u64) -> Vec<u8> {
    prefixed(REFS_LOG_PREFIX, seq)
}

fn prefixed(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A record: per change the fingerprint, the length of the value (0: gone), the value.
fn encode_record(changes: &[RefChange]) -> Vec<u8> {
    let mut v = Vec::with_capacity(changes.len() * (Fingerprint::LEN + 17));
    for (fp, entry) in changes {
        v.extend_from_slice(&fp.0);
        match entry {
            None => v.push(0),
            Some(e) => {
                let value = encode_ref(*e);
                v.push(value.len() as u8);
                v.extend_from_slice(&value);
            }
        }
    }
    v
}

fn decode_record(mut bytes: &[u8]) -> Result<Vec<RefChange>> {
    let bad = || StoreError::Corrupt("reference journal record truncated".into());
    let mut changes = Vec::new();
    while !bytes.is_empty() {
        let fp = Fingerprint::from_slice(bytes.get(..Fingerprint::LEN).ok_or_else(bad)?).ok_or_else(bad)?;
        let len = *bytes.get(Fingerprint::LEN).ok_or_else(bad)? as usize;
        let value = bytes.get(Fingerprint::LEN + 1..Fingerprint::LEN + 1 + len).ok_or_else(bad)?;
        changes.push((fp, if len == 0 { None } else { Some(parse_ref(value)?) }));
        bytes = &bytes[Fingerprint::LEN + 1 + len..];
    }
    Ok(changes)
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    entry: Option<RefEntry>,
    seq: u64,
}

#[derive(Debug, Default)]
struct Seqs {
    next: u64,
    /// Records written or being written whose changes are not in the overlay yet.
    in_flight: BTreeSet<u64>,
    /// Every record below this one has been deleted.
    deleted_below: u64,
}

impl Seqs {
    fn watermark(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

/// A journal record put in a batch: apply it with [`RefsLog::applied`] once the batch is
/// written; dropped unapplied (the write failed), it only leaves its sequence number.
pub(super) struct Staged<'a> {
    log: &'a RefsLog,
    seq: u64,
    changes: Vec<RefChange>,
    maps: Option<MapChanges>,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        self.log.seqs.lock().in_flight.remove(&self.seq);
    }
}

/// What the store's fold thread waits on.
#[derive(Debug, Default)]
struct Wake {
    stop: bool,
    due: bool,
}

#[derive(Debug)]
pub(super) struct RefsLog {
    shards: Vec<Mutex<FingerprintMap<Pending>>>,
    len: AtomicUsize,
    /// The block map's changes, journalled with the counts' (see `map_overlay`).
    pub(super) maps: MapOverlay,
    seqs: Mutex<Seqs>,
    /// One fold at a time.
    folding: Mutex<()>,
    wake: Mutex<Wake>,
    woken: Condvar,
}

impl RefsLog {
    /// Applies the journal left by the last run (if any) to `refs` and empties it.
    pub(super) fn open(engine: &dyn KvEngine, map_cache_entries: usize) -> Result<Arc<RefsLog>> {
        let log = Arc::new(RefsLog {
            shards: (0..SHARDS).map(|_| Mutex::new(FingerprintMap::default())).collect(),
            len: AtomicUsize::new(0),
            maps: MapOverlay::new(map_cache_entries),
            seqs: Mutex::new(Seqs::default()),
            folding: Mutex::new(()),
            wake: Mutex::new(Wake::default()),
            woken: Condvar::new(),
        });
        let end = prefix_end(REFS_LOG_PREFIX).expect("a prefix with an end");
        let mut latest: BTreeMap<Fingerprint, Option<RefEntry>> = BTreeMap::new();
        let mut records = 0u64;
        let mut last = None;
        for kv in engine.scan(Cf::Meta, REFS_LOG_PREFIX, Some(&end))? {
            let (key, value) = kv?;
            let seq = key.get(REFS_LOG_PREFIX.len()..).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes);
            let seq = seq.ok_or_else(|| StoreError::Corrupt(format!("reference journal key of {} bytes", key.len())))?;
            latest.extend(decode_record(&value)?);
            records += 1;
            last = Some(seq);
        }
        // Map records share their commit's sequence number; a commit that changed no count
        // has a map record only.
        let maps_end = prefix_end(MAPS_LOG_PREFIX).expect("a prefix with an end");
        let mut latest_maps: BTreeMap<(u64, u64), Option<MapEntry>> = BTreeMap::new();
        for kv in engine.scan(Cf::Meta, MAPS_LOG_PREFIX, Some(&maps_end))? {
            let (key, value) = kv?;
            let seq = key.get(MAPS_LOG_PREFIX.len()..).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes);
            let seq = seq.ok_or_else(|| StoreError::Corrupt(format!("map journal key of {} bytes", key.len())))?;
            let record = map_overlay::decode_record(&value)?;
            latest_maps.extend(record.changes.into_iter().map(|(block, e)| ((record.disk.0, block), e)));
            records += 1;
            last = last.max(Some(seq));
        }
        if let Some(last) = last {
            let changes = latest.len() + latest_maps.len();
            let mut entries = latest_maps.into_iter().map(|((disk, block), e)| Ok((map_key(DiskId(disk), block).to_vec(), e.map(encode_map_entry))));
            engine.ingest_sorted_changes(Cf::Maps, &mut entries)?;
            let mut entries = latest.into_iter().map(|(fp, e)| Ok((fp.0.to_vec(), e.map(encode_ref))));
            engine.ingest_sorted_changes(Cf::Refs, &mut entries)?;
            let mut batch = WriteBatch::new();
            batch.delete_range(Cf::Meta, REFS_LOG_PREFIX, &end);
            batch.delete_range(Cf::Meta, MAPS_LOG_PREFIX, &maps_end);
            engine.write(batch)?;
            engine.sync()?;
            tracing::info!(records, changes, "journal of the last run applied");
            let mut seqs = log.seqs.lock();
            seqs.next = last + 1;
            seqs.deleted_below = last + 1;
        }
        Ok(log)
    }

    /// Starts the thread that folds the overlay once it holds [`FOLD_AT`] fingerprints.
    pub(super) fn start_folding(self: &Arc<Self>, engine: Arc<dyn KvEngine>, data: Option<Arc<Containers>>) -> JoinHandle<()> {
        let log = Arc::clone(self);
        std::thread::Builder::new()
            .name("refs-fold".into())
            .spawn(move || loop {
                {
                    let mut wake = log.wake.lock();
                    while !wake.stop && !wake.due {
                        log.woken.wait(&mut wake);
                    }
                    if wake.stop {
                        return;
                    }
                    wake.due = false;
                }
                // Commits that crossed the mark during the last fold asked for another; with
                // most of the overlay folded by then, it would only add a small table file.
                if log.pending() < FOLD_AT {
                    continue;
                }
                if let Err(e) = log.fold(engine.as_ref(), data.as_deref()) {
                    tracing::warn!(error = %e, "folding reference changes into refs failed; they stay journalled and are retried");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    log.wake.lock().due = true;
                }
            })
            .expect("spawning the refs-fold thread")
    }

    /// Stops the fold thread (it finishes a fold under way).
    pub(super) fn stop_folding(&self) {
        self.wake.lock().stop = true;
        self.woken.notify_all();
    }

    /// Fingerprints whose current entries are in the overlay.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The larger of the two overlays (fingerprints, map entries): what folds are due by.
    pub(super) fn pending(&self) -> usize {
        self.len().max(self.maps.len())
    }

    fn shard(&self, fp: &Fingerprint) -> &Mutex<FingerprintMap<Pending>> {
        &self.shards[fp.0[4] as usize % SHARDS]
    }

    /// The overlay's entry of `fp`: None when `refs` holds the current one; Some(None) when the
    /// entry is gone.
    pub(super) fn lookup(&self, fp: &Fingerprint) -> Option<Option<RefEntry>> {
        if self.len() == 0 {
            return None;
        }
        self.shard(fp).lock().get(fp).map(|p| p.entry)
    }

    /// A copy of the overlay (at most [`FOLD_HARD_CAP`] entries and those of one commit).
    pub(super) fn snapshot(&self) -> FingerprintMap<Option<RefEntry>> {
        let mut copy = FingerprintMap::with_capacity_and_hasher(self.len(), Default::default());
        for shard in &self.shards {
            copy.extend(shard.lock().iter().map(|(fp, p)| (*fp, p.entry)));
        }
        copy
    }

    /// Puts `changes` in `batch` as one journal record, and `maps` (if any) as a map record
    /// under the same sequence number. The caller holds the fingerprints' and the blocks'
    /// stripes until it has called [`RefsLog::applied`].
    pub(super) fn stage(&self, batch: &mut WriteBatch, changes: Vec<RefChange>, maps: Option<MapChanges>) -> Staged<'_> {
        let seq = {
            let mut seqs = self.seqs.lock();
            let seq = seqs.next;
            seqs.next += 1;
            seqs.in_flight.insert(seq);
            seq
        };
        if !changes.is_empty() {
            batch.put(Cf::Meta, log_key(seq), encode_record(&changes));
        }
        let maps = maps.filter(|m| !m.is_empty());
        if let Some(m) = &maps {
            batch.put(Cf::Meta, prefixed(MAPS_LOG_PREFIX, seq), map_overlay::encode_record(m));
        }
        Staged { log: self, seq, changes, maps }
    }

    /// The batch holding `staged`'s record is written: its changes go to the overlay.
    pub(super) fn applied(&self, staged: Staged<'_>) {
        for (fp, entry) in &staged.changes {
            let mut shard = self.shard(fp).lock();
            if shard.insert(*fp, Pending { entry: *entry, seq: staged.seq }).is_none() {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(maps) = &staged.maps {
            self.maps.apply(staged.seq, maps);
        }
        let len = self.pending();
        drop(staged);
        if len >= FOLD_AT {
            let mut wake = self.wake.lock();
            if !wake.due {
                wake.due = true;
                self.woken.notify_all();
            }
        }
    }

    /// Writes the overlay's entries into `refs` and deletes the journal records they cover.
    /// Returns how many entries were written. `data`: the containers the entries name, synced
    /// before the engine's log, as a FLUSH does (the log names their new slots).
    pub(super) fn fold(&self, engine: &dyn KvEngine, data: Option<&Containers>) -> Result<usize> {
        let _one = self.folding.lock();
        let (watermark, deleted_below) = {
            let seqs = self.seqs.lock();
            (seqs.watermark(), seqs.deleted_below)
        };
        let mut entries: Vec<(Fingerprint, Pending)> = Vec::with_capacity(self.len());
        for shard in &self.shards {
            entries.extend(shard.lock().iter().map(|(fp, p)| (*fp, *p)));
        }
        let map_entries = self.maps.collect();
        if entries.is_empty() && map_entries.is_empty() && watermark == deleted_below {
            return Ok(0);
        }
        entries.sort_unstable_by_key(|(fp, _)| *fp);
        let started = std::time::Instant::now();
        // Every change collected is in the engine's log (a commit writes its batch before the
        // overlay sees it); make the log durable before `refs` gets ahead of it, and the
        // blocks it names before the log.
        if let Some(containers) = data {
            containers.sync()?;
        }
        let containers_synced = started.elapsed();
        engine.sync()?;
        let log_synced = started.elapsed();
        // Maps and counts are linked in two steps; a crash between them leaves every record,
        // which the next open applies again (values are absolute).
        let mut values = map_entries.iter().map(|((disk, block), p)| Ok((map_key(DiskId(*disk), *block).to_vec(), p.entry.map(encode_map_entry))));
        engine.ingest_sorted_changes(Cf::Maps, &mut values)?;
        let mut values = entries.iter().map(|(fp, p)| Ok((fp.0.to_vec(), p.entry.map(encode_ref))));
        engine.ingest_sorted_changes(Cf::Refs, &mut values)?;
        if watermark > deleted_below {
            let mut batch = WriteBatch::new();
            batch.delete_range(Cf::Meta, &prefixed(MAPS_LOG_PREFIX, deleted_below), &prefixed(MAPS_LOG_PREFIX, watermark));
            batch.delete_range(Cf::Meta, &log_key(deleted_below), &log_key(watermark));
            engine.write(batch)?;
            self.seqs.lock().deleted_below = watermark;
        }
        let mut removed = self.maps.remove_folded(&map_entries, watermark);
        for (fp, p) in &entries {
            // Changed since it was collected: the newer value waits for the next fold. Written
            // at or past the watermark: its record stays, and an open would apply it over
            // `refs` again, so the entry stays too, to keep every later change of this
            // count in the journal (a disk copy's merge operand would be overwritten).
            if p.seq >= watermark {
                continue;
            }
            let mut shard = self.shard(fp).lock();
            if shard.get(fp).is_some_and(|now| now.seq == p.seq) {
                shard.remove(fp);
                // Under the shard's lock, as the increment is: `len` never counts an entry
                // that is not there, nor misses one another thread has seen.
                self.len.fetch_sub(1, Ordering::Relaxed);
                removed += 1;
            }
        }
        tracing::debug!(
            entries = entries.len(),
            map_entries = map_entries.len(),
            removed,
            containers_synced_ms = containers_synced.as_millis() as u64,
            log_synced_ms = log_synced.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "reference changes folded into refs"
        );
        Ok(entries.len() + map_entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::Location;

    fn entry(count: u64, slot: u32) -> Option<RefEntry> {
        Some(RefEntry { count, location: Some(Location { container: 1, slot }) })
    }

    fn refs_value(engine: &dyn KvEngine, fp: Fingerprint) -> Option<RefEntry> {
        engine.get(Cf::Refs, &fp.0).unwrap().map(|v| parse_ref(&v).unwrap())
    }

    fn journal_records(engine: &dyn KvEngine) -> usize {
        engine.scan(Cf::Meta, REFS_LOG_PREFIX, Some(&prefix_end(REFS_LOG_PREFIX).unwrap())).unwrap().count()
    }

    #[test]
    fn a_fold_keeps_the_record_of_a_commit_not_yet_applied_and_a_reopen_replays_it() {
        let engine = crate::engine::MemEngine::new();
        let log = RefsLog::open(&engine, 0).unwrap();
        let (a, b) = (Fingerprint([1; 16]), Fingerprint([2; 16]));
        // a: written and applied; b: written, its overlay update still to come.
        let mut batch = WriteBatch::new();
        let staged_a = log.stage(&mut batch, vec![(a, entry(1, 0))], None);
        engine.write(batch).unwrap();
        log.applied(staged_a);
        let mut batch = WriteBatch::new();
        let staged_b = log.stage(&mut batch, vec![(b, entry(2, 1)), (a, entry(3, 0))], None);
        engine.write(batch).unwrap();
        // c: written and applied after b.
        let c = Fingerprint([3; 16]);
        let mut batch = WriteBatch::new();
        let staged_c = log.stage(&mut batch, vec![(c, entry(1, 2))], None);
        engine.write(batch).unwrap();
        log.applied(staged_c);
        assert_eq!(log.lookup(&a), Some(entry(1, 0)));
        assert_eq!(log.fold(&engine, None).unwrap(), 2);
        assert_eq!(refs_value(&engine, a), entry(1, 0));
        assert_eq!(refs_value(&engine, c), entry(1, 2));
        assert_eq!(journal_records(&engine), 2, "b's and c's records stay: b's changes are not folded");
        // a's record is gone, so a leaves the overlay; c's stays, so c stays in it too (a
        // change made outside the journal would be undone by a replay of c's record).
        assert_eq!((log.lookup(&a), log.lookup(&c)), (None, Some(entry(1, 2))));
        assert_eq!(log.len(), 1);
        // "Crash" before b's overlay update: a reopen replays b's record.
        std::mem::forget(staged_b);
        let reopened = RefsLog::open(&engine, 0).unwrap();
        assert_eq!(refs_value(&engine, a), entry(3, 0));
        assert_eq!(refs_value(&engine, b), entry(2, 1));
        assert_eq!(refs_value(&engine, c), entry(1, 2));
        assert_eq!(journal_records(&engine), 0);
        // New records number after the replayed ones.
        let mut batch = WriteBatch::new();
        let staged = reopened.stage(&mut batch, vec![(b, None)], None);
        assert_eq!(staged.seq, 3);
        engine.write(batch).unwrap();
        reopened.applied(staged);
        assert_eq!(reopened.lookup(&b), Some(None));
        reopened.fold(&engine, None).unwrap();
        assert_eq!(refs_value(&engine, b), None);
        assert_eq!((reopened.len(), journal_records(&engine)), (0, 0));
    }

    #[test]
    fn map_changes_are_journalled_with_the_counts_folded_into_maps_and_replayed_after_a_crash() {
        use crate::keys::parse_map_entry;
        let engine = crate::engine::MemEngine::new();
        let log = RefsLog::open(&engine, 16).unwrap();
        let (a, b) = (Fingerprint([1; 16]), Fingerprint([2; 16]));
        let disk = DiskId(5);
        let map_value = |block: u64| engine.get(Cf::Maps, &map_key(disk, block)).unwrap().map(|v| parse_map_entry(&v).unwrap().fp);
        let maps = |changes: Vec<(u64, Option<Fingerprint>)>| {
            Some(MapChanges { disk, changes: changes.into_iter().map(|(b, fp)| (b, fp.map(|fp| MapEntry { fp, hint: None }))).collect() })
        };
        // Commit 1: blocks 0 and 1 map a; applied, then folded.
        let mut batch = WriteBatch::new();
        let staged = log.stage(&mut batch, vec![(a, entry(2, 0))], maps(vec![(0, Some(a)), (1, Some(a))]));
        engine.write(batch).unwrap();
        log.applied(staged);
        assert_eq!(log.maps.get(disk, 1).map(|e| e.map(|e| e.fp)), Some(Some(a)));
        assert_eq!(map_value(1), None, "not in maps before a fold");
        log.fold(&engine, None).unwrap();
        assert_eq!((map_value(0), map_value(1), log.maps.len()), (Some(a), Some(a), 0));
        // Commit 2: block 1 becomes b, block 0 a hole; a map record only for a commit with no
        // count change is possible too (commit 3). Both written, then a crash before any fold.
        let mut batch = WriteBatch::new();
        let staged = log.stage(&mut batch, vec![(a, entry(1, 0)), (b, entry(1, 1))], maps(vec![(0, None), (1, Some(b))]));
        engine.write(batch).unwrap();
        log.applied(staged);
        let mut batch = WriteBatch::new();
        let staged = log.stage(&mut batch, vec![], maps(vec![(7, Some(b))]));
        engine.write(batch).unwrap();
        std::mem::forget(staged);
        let reopened = RefsLog::open(&engine, 16).unwrap();
        assert_eq!((map_value(0), map_value(1), map_value(7)), (None, Some(b), Some(b)));
        assert_eq!(refs_value(&engine, a), entry(1, 0));
        assert_eq!(engine.scan(Cf::Meta, MAPS_LOG_PREFIX, Some(&prefix_end(MAPS_LOG_PREFIX).unwrap())).unwrap().count(), 0);
        // Numbering goes on after the replayed records (commit 3 had only a map record).
        let mut batch = WriteBatch::new();
        assert_eq!(reopened.stage(&mut batch, vec![], maps(vec![(2, Some(a))])).seq, 3);
    }

    #[test]
    fn records_round_trip_and_truncation_is_an_error() {
        let changes = vec![
            (Fingerprint([1; 16]), Some(RefEntry { count: 3, location: Some(Location { container: 7, slot: 9 }) })),
            (Fingerprint([2; 16]), None),
            (Fingerprint([3; 16]), Some(RefEntry { count: 1, location: None })),
        ];
        let bytes = encode_record(&changes);
        assert_eq!(decode_record(&bytes).unwrap(), changes);
        for cut in 1..bytes.len() {
            if decode_record(&bytes[..cut]).is_ok() {
                // Only whole changes decode: a cut between two of them.
                assert!(cut == 33 || cut == 33 + 17, "cut at {cut} decoded");
            }
        }
    }
}
