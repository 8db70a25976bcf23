//! The source's side of deltas (see the protocol's "Delta" notes): which wanted blocks have a
//! similar block the destination may hold, the REF_QUERY about them, and delta records.
//!
//! Memory: a wanted block waits here at most once (between WANT and its REF_HELD), with its
//! candidate's fingerprint and location (about 60 bytes); WANT itself is bounded by the
//! destination's listing window, and so is this.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use cas_store::container::Location;
use cas_store::resemblance::sketch;
use cas_store::{Fingerprint, Store};

use super::status::MigrationStatus;
use crate::blocking;
use crate::compress::Record;
use crate::protocol::Message;
use crate::recent::RecentFingerprints;

/// Wanted blocks looked up in the resemblance index per step (between two data frames):
/// about 10 µs each (read, sketch, three index reads, the candidate's read and fingerprint).
const PROPOSE_STEP: usize = 512;
/// Blocks looked up ahead of the sender at most (waiting in its background queue): 8 MiB of
/// blocks, a few hundred milliseconds of a 100 Mbit/s link, longer than a query's round trip.
pub(crate) const LOOK_AHEAD_BLOCKS: usize = 2048;
/// Candidate locations tried per block (the block itself is usually one of them).
const CANDIDATES_TRIED: usize = 3;
/// After this many lookups and `GIVE_UP_TRIED` deltas tried, a connection on which fewer
/// than one looked-up block in `GIVE_UP_RATIO` went as a delta stops looking: a store with
/// nothing similar (fresh installs at both ends: candidates are found, but among the disk's
/// own blocks, and few deltas pay) should not cost ~10 µs of CPU per wanted block.
const GIVE_UP_AFTER: u64 = 4096;
const GIVE_UP_TRIED: u64 = 512;
const GIVE_UP_RATIO: u64 = 50;
/// The level deltas are compressed at, at most (4 KiB against a 4 KiB dictionary: higher
/// levels cost far more time for a few bytes).
const MAX_DELTA_LEVEL: i32 = 9;

/// A candidate reference for a wanted block.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    block: Fingerprint,
    reference: Fingerprint,
    at: Location,
}

/// Plans deltas for one connection.
#[derive(Debug)]
pub(crate) struct DeltaPlanner {
    enabled: bool,
    /// Wanted blocks not looked up yet.
    to_propose: VecDeque<Fingerprint>,
    /// Candidates asked about, by query id.
    asked: HashMap<u64, Vec<Candidate>>,
    next_query: u64,
    /// Blocks whose reference the destination holds: sent as deltas against it.
    confirmed: HashMap<Fingerprint, (Fingerprint, Location)>,
    /// Blocks the destination could not rebuild from a delta: sent whole from now on.
    refused: RecentFingerprints,
    /// Blocks looked up, deltas tried (confirmed references handed to a batch), and deltas
    /// sent.
    looked_up: u64,
    tried: u64,
    paid: u64,
}

impl DeltaPlanner {
    pub(crate) fn new(enabled: bool) -> DeltaPlanner {
        DeltaPlanner {
            enabled,
            to_propose: VecDeque::new(),
            asked: HashMap::new(),
            next_query: 0,
            confirmed: HashMap::new(),
            refused: RecentFingerprints::new(1 << 16),
            looked_up: 0,
            tried: 0,
            paid: 0,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether blocks are still to be looked up (answers to queries arrive as work).
    pub(crate) fn has_work(&self) -> bool {
        !self.to_propose.is_empty()
    }

    /// Wanted blocks: looked up first, unless a delta was refused for them.
    pub(crate) fn wanted(&mut self, fps: Vec<Fingerprint>, background: &mut VecDeque<Fingerprint>) {
        for fp in fps {
            if self.refused.contains(&fp) {
                background.push_back(fp);
            } else {
                self.to_propose.push_back(fp);
            }
        }
    }

    /// REF_HELD: the candidates held there become references; every block of the query
    /// goes to the background queue.
    pub(crate) fn answered(&mut self, id: u64, held: &[bool], background: &mut VecDeque<Fingerprint>) {
        let Some(candidates) = self.asked.remove(&id) else {
            tracing::warn!(id, "REF_HELD for a query not asked on this connection; ignored");
            return;
        };
        let answers_all = held.len() == candidates.len();
        if !answers_all {
            tracing::warn!(id, asked = candidates.len(), answered = held.len(), "REF_HELD does not answer its query; its blocks go whole");
        }
        for (c, &is_held) in candidates.iter().zip(held.iter().chain(std::iter::repeat(&false))) {
            if answers_all && is_held {
                self.confirmed.insert(c.block, (c.reference, c.at));
            }
            background.push_back(c.block);
        }
    }

    /// REFETCH: those blocks go whole from now on.
    pub(crate) fn refused(&mut self, fps: &[Fingerprint]) {
        for fp in fps {
            self.confirmed.remove(fp);
            self.refused.insert(*fp);
        }
    }

    /// The confirmed references of a batch about to be sent (each used once).
    pub(crate) fn references_for(&mut self, batch: &[Fingerprint]) -> Vec<Option<(Fingerprint, Location)>> {
        if self.confirmed.is_empty() {
            return vec![None; batch.len()];
        }
        let refs: Vec<_> = batch.iter().map(|fp| self.confirmed.remove(fp)).collect();
        self.tried += refs.iter().filter(|r| r.is_some()).count() as u64;
        refs
    }

    /// Deltas a batch sent (those that paid).
    pub(crate) fn sent(&mut self, deltas: u64) {
        self.paid += deltas;
    }

    /// Looks up the next slice of wanted blocks: those without a candidate go to `background`
    /// at once (returned through the queue), the others wait for the REF_QUERY returned here.
    pub(crate) async fn propose_next(&mut self, store: &Arc<Store>, status: &Arc<MigrationStatus>, background: &mut VecDeque<Fingerprint>) -> Option<Message> {
        if self.to_propose.is_empty() {
            return None;
        }
        let n = PROPOSE_STEP.min(self.to_propose.len());
        let slice: Vec<Fingerprint> = self.to_propose.drain(..n).collect();
        let s = store.clone();
        let looked = slice.clone();
        let (candidates, without) = blocking(move || Ok::<_, crate::MigrationError>(look_up(&s, looked))).await.unwrap_or((Vec::new(), slice));
        background.extend(without);
        self.looked_up += n as u64;
        if self.looked_up >= GIVE_UP_AFTER && self.tried >= GIVE_UP_TRIED && self.paid * GIVE_UP_RATIO < self.looked_up {
            tracing::info!(looked_up = self.looked_up, tried = self.tried, sent = self.paid, "few deltas pay here: sending the rest whole without looking");
            self.enabled = false;
            background.extend(self.to_propose.drain(..));
        }
        if candidates.is_empty() {
            return None;
        }
        status.update(|r| r.delta_candidates += candidates.len() as u64);
        let id = self.next_query;
        self.next_query += 1;
        let refs = candidates.iter().map(|c| c.reference).collect();
        self.asked.insert(id, candidates);
        Some(Message::RefQuery { id, refs })
    }
}

/// For each block, the first indexed block that resembles it, is not itself, and can be read
/// (its fingerprint computed here: the index keeps locations). A lookup that fails only
/// means no delta for that block. The block and its reference are read again when the
/// delta is encoded (from the page cache): keeping them until then would hold 8 KiB per
/// block waiting for its REF_HELD.
fn look_up(store: &Store, slice: Vec<Fingerprint>) -> (Vec<Candidate>, Vec<Fingerprint>) {
    let blocks = match store.get_blocks(&slice) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read wanted blocks to look for references; sending them whole");
            return (Vec::new(), slice);
        }
    };
    let (mut candidates, mut without) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; store.block_size() as usize];
    for (fp, data) in slice.into_iter().zip(blocks) {
        let found = data.and_then(|data| {
            let locations = store.similar_blocks(&sketch(&data)?).ok()?;
            locations.into_iter().take(CANDIDATES_TRIED).find_map(|at| {
                store.read_location(at, &mut buf).ok()?;
                let reference = store.fingerprint(&buf);
                (reference != fp).then_some(Candidate { block: fp, reference, at })
            })
        });
        match found {
            Some(c) => candidates.push(c),
            None => without.push(fp),
        }
    }
    (candidates, without)
}

/// The records of a batch: blocks with a confirmed reference as deltas when that pays,
/// the others whole, and those no longer held as gone.
pub(crate) fn block_records(
    store: &Store,
    batch: &[Fingerprint],
    blocks: Vec<Option<Arc<[u8]>>>,
    references: Vec<Option<(Fingerprint, Location)>>,
    level: i32,
) -> Vec<Record> {
    let mut base = vec![0u8; store.block_size() as usize];
    batch
        .iter()
        .zip(blocks)
        .zip(references)
        .map(|((fp, b), reference)| match b {
            None => Record::Gone(*fp),
            Some(data) => {
                let delta = reference.and_then(|(reference, at)| {
                    store.read_location(at, &mut base).ok()?;
                    // A small write may have taken the dead slot since it was confirmed.
                    if store.fingerprint(&base) != reference {
                        return None;
                    }
                    let delta = crate::delta::encode(&data, &base, level.clamp(1, MAX_DELTA_LEVEL))?;
                    Some(Record::Delta { fp: *fp, reference, delta })
                });
                delta.unwrap_or_else(|| Record::Block { fp: *fp, data: data.to_vec() })
            }
        })
        .collect()
}

/// Deltas in a batch: how many, and their bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DeltaCount {
    pub(crate) blocks: u64,
    pub(crate) bytes: u64,
}

impl DeltaCount {
    pub(crate) fn of(records: &[Record]) -> DeltaCount {
        let mut n = DeltaCount::default();
        for r in records {
            if let Record::Delta { delta, .. } = r {
                n.blocks += 1;
                n.bytes += delta.len() as u64;
            }
        }
        n
    }
}
