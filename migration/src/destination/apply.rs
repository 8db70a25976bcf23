//! Applying listings and block records to the incoming disk.

use std::collections::HashSet;

use cas_store::Fingerprint;

use crate::compress::Record;
use crate::delta::DeltaError;
use crate::protocol::Run;
use crate::MigrationError;

use super::*;

/// What a listing frame needs once its contents are looked up.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    /// Content to ask the source for.
    pub(crate) want: Vec<Fingerprint>,
    /// One flag per listed block of the frame, in order: set on the block whose content
    /// went into `want` (the same request by position, WANT_LISTED).
    pub(crate) want_flags: Vec<bool>,
    /// Blocks whose content is here, to map (see [`map_present`]).
    pub(crate) present: Vec<(u64, Fingerprint)>,
}

/// Looks a listing frame's contents up and records what is missing; returns what to ask for
/// and the blocks whose content is here, which the caller maps (now, or through the
/// session's backlog: see `backlog.rs`). `defer`: missing content is recorded for the
/// switch-over instead of asked for now.
pub(crate) fn apply_fingerprints(inc: &Incoming, runs: Vec<Run>, defer: bool) -> Result<Listed, MigrationError> {
    let store = &inc.store;
    let mut entries: Vec<(u64, Fingerprint)> = Vec::new();
    let mut zero_runs: Vec<(u64, u64)> = Vec::new();
    for run in runs {
        match run {
            Run::Mapped { first, fps } => entries.extend(fps.into_iter().enumerate().map(|(i, fp)| (first + i as u64, fp))),
            Run::Zero { first, count } => zero_runs.push((first, count)),
        }
    }
    let bs = inc.block_size;
    for (first, count) in zero_runs {
        {
            let mut p = inc.pending.lock();
            for b in first..first + count {
                p.by_block.remove(&b);
            }
        }
        store.write_zeroes(inc.disk, first * bs, count * bs, false)?;
    }
    if entries.is_empty() {
        return Ok(Listed::default());
    }
    // A listed block supersedes whatever it was waiting for.
    {
        let mut p = inc.pending.lock();
        if !p.by_block.is_empty() {
            for (b, _) in &entries {
                p.by_block.remove(b);
            }
        }
    }
    let mut distinct: Vec<Fingerprint> = entries.iter().map(|e| e.1).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let present: HashSet<Fingerprint> = distinct.iter().zip(store.has_many(&distinct)?).filter(|(_, h)| *h).map(|(fp, _)| *fp).collect();

    let mut to_map: Vec<(u64, Fingerprint)> = Vec::new();
    let mut want: Vec<Fingerprint> = Vec::new();
    let mut want_flags: Vec<bool> = Vec::with_capacity(entries.len());
    let mut p = inc.pending.lock();
    for (block, fp) in entries {
        let asked = want.len();
        if p.wanted.contains(&fp) || p.borrowed.contains(&fp) {
            p.report.duplicates += 1;
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
        } else if present.contains(&fp) {
            if p.received.contains(&fp) {
                p.report.duplicates += 1;
            } else {
                p.report.neighbour_hits += 1;
            }
            to_map.push((block, fp));
        } else if p.deferred.contains(&fp) {
            p.report.duplicates += 1;
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
        } else if defer {
            p.deferred.insert(fp);
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
        } else {
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
            ask_for(inc, &mut p, fp, &mut want);
        }
        want_flags.push(want.len() > asked);
        p.report.blocks_listed += 1;
    }
    if !p.phase.has_switched() {
        p.report.missing_peak = p.report.missing_peak.max(p.by_block.len() as u64);
    }
    Ok(Listed { want, want_flags, present: to_map })
}

/// Maps listed blocks to content that was here when they were looked up; returns what to ask
/// for: blocks whose content was deleted here since (another disk let go of it) are missing
/// like any other.
pub(crate) fn map_present(inc: &Incoming, present: Vec<(u64, Fingerprint)>) -> Result<Vec<Fingerprint>, MigrationError> {
    let mut want = Vec::new();
    if present.is_empty() {
        return Ok(want);
    }
    let applied = inc.store.map_existing(inc.disk, &present)?;
    let mut p = inc.pending.lock();
    for ((block, fp), ok) in present.into_iter().zip(applied) {
        if !ok {
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
            ask_for(inc, &mut p, fp, &mut want);
        }
    }
    Ok(want)
}

/// Rebuilds the blocks that came as deltas from the blocks they name here. A delta that
/// cannot be used (its reference is not here, it does not decode, or what it decodes to does
/// not match its fingerprint) is dropped and returned, to be asked for whole; nothing of it
/// is stored.
fn resolve_deltas(inc: &Incoming, records: Vec<Record>) -> Result<(Vec<Record>, Vec<Fingerprint>), MigrationError> {
    if !records.iter().any(|r| matches!(r, Record::Delta { .. })) {
        return Ok((records, Vec::new()));
    }
    let store = &inc.store;
    let refs: Vec<Fingerprint> = records.iter().filter_map(|r| if let Record::Delta { reference, .. } = r { Some(*reference) } else { None }).collect();
    let mut bases = store.get_blocks(&refs)?.into_iter();
    let (mut out, mut refetch) = (Vec::with_capacity(records.len()), Vec::new());
    for record in records {
        let Record::Delta { fp, reference, delta } = record else {
            out.push(record);
            continue;
        };
        let base = bases.next().expect("one per delta");
        let decoded = match base {
            None => Err(DeltaError::ReferenceMissing),
            Some(base) => crate::delta::decode(&delta, &base, inc.block_size as usize).and_then(|data| {
                if store.fingerprint(&data) == fp {
                    Ok(data)
                } else {
                    Err(DeltaError::FingerprintMismatch)
                }
            }),
        };
        match decoded {
            Ok(data) => out.push(Record::Block { fp, data }),
            Err(why) => {
                tracing::warn!(block = %fp, reference = %reference, %why, "a delta could not be used; asking for the block whole");
                refetch.push(fp);
            }
        }
    }
    let mut p = inc.pending.lock();
    p.report.delta_blocks += (refs.len() - refetch.len()) as u64;
    p.report.delta_refetched += refetch.len() as u64;
    Ok((out, refetch))
}

/// Applies block records; returns the blocks that came as deltas it could not use, which
/// the caller asks for whole (REFETCH).
pub(crate) fn apply_records(inc: &Incoming, records: Vec<Record>) -> Result<Vec<Fingerprint>, MigrationError> {
    let store = &inc.store;
    let (records, refetch) = resolve_deltas(inc, records)?;
    // Every block is checked against its fingerprint (or, sent unnamed, named by it) before
    // anything is applied, and before the pending lock, which readers of the disk wait for.
    // An unnamed block is kept below only if its fingerprint is one this disk asked for.
    // Hashing holds no lock: it runs as bulk work (see `sched`).
    let class = crate::sched::BulkClass::enter();
    let records = records
        .into_iter()
        .map(|record| match record {
            Record::Content(data) => Ok(Record::Block { fp: store.fingerprint(&data), data }),
            Record::Block { fp, data } if store.fingerprint(&data) != fp => {
                Err(MigrationError::Corrupt(format!("block {fp} arrived with content that does not match")))
            }
            other => Ok(other),
        })
        .collect::<Result<Vec<Record>, MigrationError>>()?;
    drop(class);
    let mut p = inc.pending.lock();
    // Content stored (or given up) here, which other migrations of the gang may wait for.
    let mut arrived: Vec<Fingerprint> = Vec::new();
    // One block per content is written, the others that wait for it mapped to it, all in a
    // few engine commits for the whole frame.
    let mut writes: Vec<(u64, Fingerprint, &[u8])> = Vec::new();
    let mut maps: Vec<(u64, Fingerprint)> = Vec::new();
    let mut done: Vec<u64> = Vec::new();
    for record in &records {
        match *record {
            Record::Block { fp, ref data } => {
                if !p.wanted.remove(&fp) {
                    // Not asked for (or already here): ignore, but do not trust it further.
                    continue;
                }
                p.received.insert(fp);
                arrived.push(fp);
                if !p.phase.has_switched() {
                    p.report.received_before_switch += 1;
                } else if p.urgent.remove(&fp) {
                    p.report.fetched_on_demand += 1;
                } else {
                    p.report.fetched_background += 1;
                }
                let blocks: Vec<u64> = p.waiting.remove(&fp).unwrap_or_default().into_iter().filter(|b| p.by_block.get(b) == Some(&fp)).collect();
                let Some((&first, rest)) = blocks.split_first() else {
                    continue;
                };
                writes.push((first, fp, data));
                maps.extend(rest.iter().map(|&b| (b, fp)));
                done.extend(blocks);
            }
            // Resolved into blocks (or left out to be asked for again), or named, above.
            Record::Delta { .. } | Record::Content(_) => {}
            Record::Gone(fp) => {
                // The source changed every block that had this content; later rounds list
                // their new content, which supersedes these entries.
                p.report.gone += 1;
                if p.wanted.remove(&fp) {
                    arrived.push(fp);
                }
                p.urgent.remove(&fp);
                for b in p.waiting.remove(&fp).unwrap_or_default() {
                    if p.by_block.get(&b) == Some(&fp) {
                        p.by_block.remove(&b);
                    }
                }
            }
        }
    }
    // Written while the pending lock is held: a reader waits for the lock rather than seeing
    // a block neither missing nor written. The copies are mapped once their content is in.
    if !writes.is_empty() {
        store.write_verified_blocks(inc.disk, &writes)?;
    }
    if !maps.is_empty() {
        store.map_existing(inc.disk, &maps)?;
    }
    if !done.is_empty() {
        if let Some(j) = inc.journal.lock().as_mut() {
            j.note_removed(&done);
        }
        for b in &done {
            p.by_block.remove(b);
        }
    }
    if let Some(member) = &inc.gang {
        member.release(&arrived);
    }
    Ok(refetch)
}
