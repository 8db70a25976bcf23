//! The property test's harness, shared by the store's own tests and `cas-rados`'s (which
//! includes this file by path): random sequences of writes, zeroes, trims, resizes, deletes
//! and snapshots over several disks that share content, applied to a store and to a plain
//! model (a byte vector per disk). After each sequence the store is reopened, every byte
//! compared, the space accounting checked against the model, and fsck run.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};

use cas_store::{CompactionStop, Store, StoreOptions};
pub use proptest::prelude::*;

pub const BS: u64 = 512;
const MAX_BLOCKS: u64 = 24;
const NAMES: [&str; 3] = ["web", "db", "app"];

#[derive(Debug, Clone)]
pub enum Op {
    /// Writes pieces of a few shared contents, so disks dedupe against each other.
    Write {
        disk: usize,
        offset: u64,
        len: u64,
        content: u8,
        shift: u8,
    },
    /// Several writes at once (`Store::write_many`): whole blocks, some overlapping, some
    /// not; the model applies them in order, as the store does when it cannot group them.
    WriteMany {
        disk: usize,
        writes: Vec<(u64, u64, u8, u8)>,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Trim {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Resize {
        disk: usize,
        blocks: u64,
    },
    DeleteAndRecreate {
        disk: usize,
        blocks: u64,
    },
    /// Takes a snapshot, writes, and checks that the snapshot still shows the earlier map.
    SnapshotThenWrite {
        disk: usize,
        offset: u64,
        content: u8,
    },
    Flush,
    /// A compaction pass (live-share threshold `share`/4), possibly stopped where a crash
    /// would stop it, then the store is reopened.
    Compact {
        share: u8,
        stop: u8,
    },
    /// Drops the store and opens it again.
    Reopen,
}

pub fn op() -> impl Strategy<Value = Op> {
    let disk = 0..NAMES.len();
    let off = 0..MAX_BLOCKS * BS;
    prop_oneof![
        6 => (disk.clone(), off.clone(), 1..4 * BS, 0..4u8, 0..3u8).prop_map(|(disk, offset, len, content, shift)| Op::Write { disk, offset, len, content, shift }),
        3 => (disk.clone(), prop::collection::vec((0..MAX_BLOCKS, 1..4u64, 0..4u8, 0..3u8), 2..6)).prop_map(|(disk, writes)| Op::WriteMany {
            disk,
            writes: writes.into_iter().map(|(block, blocks, content, shift)| (block * BS, blocks * BS, content, shift)).collect(),
        }),
        2 => (disk.clone(), off.clone(), 1..6 * BS).prop_map(|(disk, offset, len)| Op::Zero { disk, offset, len }),
        2 => (disk.clone(), off.clone(), 1..6 * BS).prop_map(|(disk, offset, len)| Op::Trim { disk, offset, len }),
        1 => (disk.clone(), 1..MAX_BLOCKS).prop_map(|(disk, blocks)| Op::Resize { disk, blocks }),
        1 => (disk.clone(), 1..MAX_BLOCKS).prop_map(|(disk, blocks)| Op::DeleteAndRecreate { disk, blocks }),
        1 => (disk.clone(), off, 0..4u8).prop_map(|(disk, offset, content)| Op::SnapshotThenWrite { disk, offset, content }),
        1 => Just(Op::Flush),
        2 => (1..=4u8, 0..4u8).prop_map(|(share, stop)| Op::Compact { share, stop }),
        1 => Just(Op::Reopen),
    ]
}

/// Content `c` is a fixed pseudo-random stream; `shift` selects where in it a write starts,
/// so the same blocks recur at different offsets and on different disks.
fn content(c: u8, shift: u8, len: u64) -> Vec<u8> {
    if c == 0 {
        return vec![0; len as usize];
    }
    (0..len)
        .map(|i| {
            let x = (i + u64::from(shift) * BS) as u32;
            (x.wrapping_mul(2_654_435_761).rotate_left(u32::from(c)) >> 13) as u8
        })
        .collect()
}

struct Model {
    disks: Vec<Vec<u8>>,
}

impl Model {
    /// Clips a range to the disk, as the test only issues in-range requests.
    fn clip(&self, disk: usize, offset: u64, len: u64) -> Option<(u64, u64)> {
        let size = self.disks[disk].len() as u64;
        (offset < size).then(|| (offset, len.min(size - offset)))
    }

    fn blocks_of(&self, disk: usize) -> Vec<(u64, Vec<u8>)> {
        self.disks[disk]
            .chunks(BS as usize)
            .enumerate()
            .filter(|(_, b)| b.iter().any(|&x| x != 0))
            .map(|(i, b)| {
                let mut full = b.to_vec();
                full.resize(BS as usize, 0);
                (i as u64, full)
            })
            .collect()
    }
}

/// Where a case's store lives. `open` is called twice per case: to create the store and to
/// reopen it for the final comparison.
pub trait Backend {
    fn open(&self, opts: StoreOptions) -> Store;
    /// Extra checks after the final comparison, given the number of distinct blocks the disks
    /// hold (an external pool can compare its own count).
    fn check(&self, _store: &Store, _distinct_blocks: u64) -> Result<(), TestCaseError> {
        Ok(())
    }
}

/// A RocksDB store in a temporary directory (the pool the store was created with).
pub struct RocksBackend(pub tempfile::TempDir);

impl Backend for RocksBackend {
    fn open(&self, opts: StoreOptions) -> Store {
        Store::open(self.0.path(), opts).unwrap()
    }
}

pub fn run(ops: Vec<Op>, backend: &dyn Backend) -> Result<(), TestCaseError> {
    // Small containers (8 blocks), so cases fill many and compaction rewrites some.
    let opts = StoreOptions { block_size: Some(BS as u32), cache_bytes: 16 * BS as usize * 16, container_bytes: 8 * BS, ..Default::default() };
    let mut model = Model { disks: vec![vec![0; (8 * BS) as usize]; NAMES.len()] };
    {
        let mut store = backend.open(opts.clone());
        for name in NAMES {
            store.create_disk(name, 8 * BS).unwrap();
        }
        for op in ops {
            match op {
                Op::Write { disk, offset, len, content: c, shift } => {
                    let Some((offset, len)) = model.clip(disk, offset, len) else { continue };
                    let data = content(c, shift, len);
                    let id = store.disk(NAMES[disk]).unwrap().id;
                    store.write(id, offset, &data, false).unwrap();
                    model.disks[disk][offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                Op::WriteMany { disk, writes } => {
                    let writes: Vec<(u64, Vec<u8>)> = writes
                        .into_iter()
                        .filter_map(|(offset, len, c, shift)| model.clip(disk, offset, len).map(|(offset, len)| (offset, content(c, shift, len))))
                        .collect();
                    let id = store.disk(NAMES[disk]).unwrap().id;
                    let requests: Vec<(u64, &[u8])> = writes.iter().map(|(offset, data)| (*offset, &data[..])).collect();
                    store.write_many(id, &requests, false).unwrap();
                    for (offset, data) in &writes {
                        model.disks[disk][*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                    }
                }
                Op::Zero { disk, offset, len } | Op::Trim { disk, offset, len } => {
                    let Some((offset, len)) = model.clip(disk, offset, len) else { continue };
                    let id = store.disk(NAMES[disk]).unwrap().id;
                    if matches!(op, Op::Zero { .. }) {
                        store.write_zeroes(id, offset, len, false).unwrap();
                    } else {
                        store.trim(id, offset, len, true).unwrap();
                    }
                    model.disks[disk][offset as usize..(offset + len) as usize].fill(0);
                }
                Op::Resize { disk, blocks } => {
                    // Sizes in 512-byte sectors but not always whole blocks of the store: here
                    // BS is 512, so every size is whole; partial blocks are covered by unit tests.
                    store.resize_disk(NAMES[disk], blocks * BS).unwrap();
                    model.disks[disk].resize((blocks * BS) as usize, 0);
                }
                Op::DeleteAndRecreate { disk, blocks } => {
                    store.delete_disk(NAMES[disk]).unwrap();
                    store.create_disk(NAMES[disk], blocks * BS).unwrap();
                    model.disks[disk] = vec![0; (blocks * BS) as usize];
                }
                Op::SnapshotThenWrite { disk, offset, content: c } => {
                    let id = store.disk(NAMES[disk]).unwrap().id;
                    let expected: Vec<(u64, cas_store::Fingerprint)> = model.blocks_of(disk).into_iter().map(|(b, d)| (b, store.fingerprint(&d))).collect();
                    let snapshot = store.map_snapshot(id).unwrap();
                    if let Some((offset, len)) = model.clip(disk, offset, 2 * BS) {
                        let data = content(c, 1, len);
                        store.write(id, offset, &data, false).unwrap();
                        model.disks[disk][offset as usize..(offset + len) as usize].copy_from_slice(&data);
                    }
                    let seen: Vec<_> = snapshot.map(|e| e.unwrap()).collect();
                    prop_assert_eq!(seen, expected);
                }
                Op::Flush => store.flush().unwrap(),
                Op::Compact { share, stop } => {
                    let share = f64::from(share) / 4.0;
                    match stop {
                        0 => {
                            store.compact(share).unwrap();
                        }
                        n => {
                            let stop = [CompactionStop::AfterCopy, CompactionStop::AfterFirstBatch, CompactionStop::BeforeDelete][usize::from(n - 1)];
                            store.compact_interrupted(share, stop).unwrap();
                        }
                    }
                    drop(store);
                    store = backend.open(opts.clone());
                    if stop > 0 {
                        // What a crash in a pass leaves is consistent as it is, before any
                        // later pass tidies it.
                        let report = store.fsck(true).unwrap();
                        prop_assert!(report.is_clean(), "fsck after a pass stopped at {}: {:?}", stop, report.problems);
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = backend.open(opts.clone());
                }
            }
        }
    }

    // Reopen and compare everything.
    let store = backend.open(StoreOptions::default());
    // A last pass that may rewrite anything: what survives it must still read right.
    store.compact(1.0).unwrap();
    let mut distinct: HashSet<Vec<u8>> = HashSet::new();
    let mut allocated = 0u64;
    for (i, name) in NAMES.iter().enumerate() {
        let info = store.disk(name).unwrap();
        prop_assert_eq!(info.size, model.disks[i].len() as u64);
        let mut buf = vec![0xa5; model.disks[i].len()];
        store.read(info.id, 0, &mut buf).unwrap();
        prop_assert!(buf == model.disks[i], "disk {} differs from the model", name);
        for (_, block) in model.blocks_of(i) {
            allocated += BS;
            distinct.insert(block);
        }
        // Block status agrees with the model: a block is allocated iff it is non-zero.
        let mut status = BTreeMap::new();
        for e in store.block_status(info.id, 0, info.size).unwrap() {
            for b in e.offset / BS..(e.offset + e.length) / BS {
                status.insert(b, e.allocated);
            }
        }
        let nonzero: HashSet<u64> = model.blocks_of(i).into_iter().map(|(b, _)| b).collect();
        for (b, allocated) in status {
            prop_assert_eq!(allocated, nonzero.contains(&b));
        }
    }
    let stats = store.stats().unwrap();
    prop_assert_eq!(stats.allocated_bytes, allocated);
    prop_assert_eq!(stats.stored_blocks, distinct.len() as u64, "each distinct block is stored once");
    let report = store.fsck(true).unwrap();
    prop_assert!(report.is_clean(), "fsck: {:?}", report.problems);
    backend.check(&store, distinct.len() as u64)
}
